//! Passive health in the lab (issue 17, docs/health-checks.md "Passive
//! health"): a backend's failure costs clients nothing. The real agent and
//! data path; the stand-in apiservers killed with no shutdown delay while a
//! LAN client opens a connection every 10 ms.
//!
//! These need the data path's side (the SUSPECT map, the PASSIVE_EVENTS
//! ring, the redispatch of a refused SYN): each test first checks that the
//! agent reports passive health on, and fails saying so otherwise.

mod common;

use std::{
    io::ErrorKind,
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{
    Session, start_agent, start_apiservers, status_json, vip_config, whoami_within, write_config,
};
use ha_lab::{Lab, LabProcess};
use nix::sys::signal::Signal;
use serde_json::Value;

const HOSTS: [&str; 5] = ["client", "lb", "api1", "api2", "api3"];

/// How long a client waits for a connection: a SYN the data path
/// redispatched is answered on the client's first retransmission (1 s).
const CONNECT: Duration = Duration::from_secs(3);

fn setup() -> (Lab, Vec<LabProcess>, LabProcess) {
    let lab = Lab::new(&HOSTS).unwrap();
    let backends = ["api1", "api2", "api3"];
    let apis = start_apiservers(&lab, &backends);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &backends));
    let agent = start_agent(&lab, "lb", &config, &[]);
    lab.wait_until(Duration::from_secs(10), "first checks", || {
        status_json(&lab, "lb")["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["checks"].as_u64().unwrap() > 0)
    })
    .unwrap();
    let status = status_json(&lab, "lb");
    assert_eq!(
        status["passive_health"]["enabled"], true,
        "passive health is off: the XDP program has no SUSPECT map or PASSIVE_EVENTS ring \
         (the data path's side of issue 17 is needed); status: {status}"
    );
    (lab, apis, agent)
}

fn backend<'a>(status: &'a Value, lab: &Lab, host: &str) -> &'a Value {
    let address = lab.host(host).addr.to_string();
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.as_str())
        .unwrap()
}

/// One attempt of the client: when it started, how long it took, what it got.
struct Attempt {
    at: Instant,
    took: Duration,
    result: Result<String, std::io::Error>,
}

/// Opens a connection to the VIP every `every` for `length` from the client
/// host (each in its own thread, so a slow one does not hold the next), while
/// `during` runs on the calling thread; every attempt's outcome.
fn load_while(lab: &Lab, every: Duration, length: Duration, during: impl FnOnce()) -> Vec<Attempt> {
    let vip = lab.vip(0);
    let attempts: Mutex<Vec<Attempt>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let attempts = &attempts;
        let client = scope.spawn(move || {
            lab.in_host("client", || {
                // Threads spawned here inherit the client's network namespace.
                std::thread::scope(|inner| {
                    let start = Instant::now();
                    while start.elapsed() < length {
                        inner.spawn(move || {
                            let at = Instant::now();
                            let result = whoami_within(vip, 6443, CONNECT).map(|(name, _)| name);
                            attempts.lock().unwrap().push(Attempt {
                                at,
                                took: at.elapsed(),
                                result,
                            });
                        });
                        std::thread::sleep(every);
                    }
                });
            })
            .unwrap()
        });
        during();
        client.join().unwrap();
    });
    let mut attempts = attempts.into_inner().unwrap();
    attempts.sort_by_key(|a| a.at);
    attempts
}

/// Failures, the slowest success after `since`, and when the last failure started after `since`.
fn summarize(attempts: &[Attempt], since: Instant) -> (usize, usize, Duration, Duration) {
    let failed = attempts.iter().filter(|a| a.result.is_err()).count();
    let refused = attempts
        .iter()
        .filter(|a| {
            a.result
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
        })
        .count();
    let slowest = attempts
        .iter()
        .filter(|a| a.at >= since && a.result.is_ok())
        .map(|a| a.took)
        .max()
        .unwrap_or_default();
    let last_failure = attempts
        .iter()
        .filter(|a| a.at >= since && a.result.is_err())
        .map(|a| a.at.duration_since(since))
        .max()
        .unwrap_or_default();
    (failed, refused, slowest, last_failure)
}

#[test]
fn a_killed_backend_costs_at_most_three_connections_and_no_other_backends_flow() {
    let (lab, apis, _agent) = setup();
    let vip = lab.vip(0);
    // Long-lived sessions to the backends that stay.
    let mut kept: Vec<(&str, Session)> = lab
        .in_host("client", || {
            ["api1", "api3"]
                .iter()
                .flat_map(|name| (0..2).map(move |_| (*name, Session::to(vip, name))))
                .collect()
        })
        .unwrap();
    let mut killed_at = None;
    let attempts = load_while(
        &lab,
        Duration::from_millis(10),
        Duration::from_secs(3),
        || {
            std::thread::sleep(Duration::from_millis(500));
            apis[1].signal(Signal::SIGKILL).unwrap();
            killed_at = Some(Instant::now());
        },
    );
    let killed_at = killed_at.unwrap();
    let (failed, refused, slowest, last_failure) = summarize(&attempts, killed_at);
    let status = status_json(&lab, "lb");
    let passive = &status["passive_health"];
    let api2 = backend(&status, &lab, "api2");
    eprintln!(
        "measured: {failed} of {} connections failed ({refused} refused), the last failure {:.0} ms after the kill; \
         slowest success after the kill {:.0} ms; passive events {}, suspects confirmed {}; api2: {} ({})",
        attempts.len(),
        last_failure.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0,
        passive["events"],
        passive["suspects_confirmed"],
        api2["state"],
        api2["out_reason"],
    );
    for attempt in attempts.iter().filter(|a| a.result.is_err()) {
        eprintln!(
            "  failed: started {:+.0} ms from the kill, took {:.0} ms: {:?}",
            attempt.at.duration_since(killed_at).as_secs_f64() * 1000.0
                - killed_at.duration_since(attempt.at).as_secs_f64() * 1000.0,
            attempt.took.as_secs_f64() * 1000.0,
            attempt.result.as_ref().err()
        );
    }
    assert!(
        failed <= 3,
        "{failed} client connections failed after a backend was killed (at most 3)"
    );
    assert!(
        passive["events"]["rst_to_syn"].as_u64().unwrap_or(0) >= 1,
        "the data path reported no refused SYN: {passive}"
    );
    // The confirming check agreed: down at once, and status says why.
    assert_eq!(api2["state"], "down", "{api2}");
    assert!(
        passive["suspects_confirmed"].as_u64().unwrap_or(0) >= 1,
        "{passive}"
    );
    assert!(
        api2["out_reason"]
            .as_str()
            .is_some_and(|r| r.contains("confirming check failed")),
        "{api2}"
    );
    // Nothing of the other backends moved: every session still talks to
    // its backend, on the same connection.
    lab.in_host("client", || {
        for (name, session) in &mut kept {
            session.assert_alive(3);
            let answer = session.exchange("whoami");
            assert!(
                answer.starts_with(*name),
                "a session of {name} now answers {answer:?}"
            );
        }
    })
    .unwrap();
}

#[test]
fn a_backend_restarted_without_a_shutdown_delay_refuses_no_client() {
    let (lab, mut apis, _agent) = setup();
    let mut restarted: Option<(Instant, Instant)> = None;
    let attempts = load_while(
        &lab,
        Duration::from_millis(10),
        Duration::from_secs(4),
        || {
            std::thread::sleep(Duration::from_millis(500));
            let victim = apis.remove(1);
            victim.signal(Signal::SIGKILL).unwrap();
            let killed = Instant::now();
            drop(victim);
            // Straight back on the same address and port, as a crash-looping
            // or rolling apiserver without --shutdown-delay-duration.
            apis.insert(1, lab.start_standin("api2", &[]).unwrap());
            restarted = Some((killed, Instant::now()));
        },
    );
    let (killed, listening) = restarted.unwrap();
    let (failed, refused, slowest, last_failure) = summarize(&attempts, killed);
    let status = status_json(&lab, "lb");
    eprintln!(
        "measured: {} connections ({:.0}/s), {refused} refused, {failed} failed in all; api2 listened again \
         {:.0} ms after the kill; the last failure {:.0} ms after the kill; slowest success after the kill {:.0} ms; \
         passive health: {}",
        attempts.len(),
        attempts.len() as f64 / 4.0,
        listening.duration_since(killed).as_secs_f64() * 1000.0,
        last_failure.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0,
        status["passive_health"],
    );
    assert!(
        attempts.len() >= 300,
        "the client opened only {} connections",
        attempts.len()
    );
    assert_eq!(refused, 0, "clients were refused while api2 restarted");
    assert_eq!(failed, 0, "client connections failed while api2 restarted");
    // api2 serves again: it takes new connections once its checks pass.
    lab.wait_until(Duration::from_secs(10), "api2 up", || {
        backend(&status_json(&lab, "lb"), &lab, "api2")["state"] == "up"
    })
    .unwrap();
}
