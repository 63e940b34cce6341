//! Health checks, drains, status and reload, in the lab with the real agent
//! probing the stand-in apiservers over HTTPS.

mod common;

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use common::{
    Session, apiserver_vip, reload, start_agent, start_apiservers, telemetry, vip_config, whoami,
    write_config, write_file,
};
use ha_lab::{
    Lab, LabProcess, bin_path,
    config::{self, VipExt},
};
use nix::sys::signal::Signal;
use serde_json::Value;

const HOSTS: [&str; 6] = ["client", "lb", "api1", "api2", "api3", "api4"];

/// `ha-user status --json`, run on the LB host like an operator would.
fn status(lab: &Lab) -> Value {
    let out = lab
        .exec(
            "lb",
            &[bin_path("ha-user").to_str().unwrap(), "status", "--json"],
        )
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn backend<'a>(status: &'a Value, lab: &Lab, host: &str) -> Option<&'a Value> {
    let address = lab.host(host).addr.to_string();
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == address.as_str())
}

fn state_of(lab: &Lab, host: &str) -> String {
    backend(&status(lab), lab, host)
        .map(|b| b["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn wait_for_state(lab: &Lab, host: &str, state: &str, timeout: Duration) -> Duration {
    lab.wait_until(timeout, &format!("{host} {state}"), || {
        state_of(lab, host) == state
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}; status: {}",
            serde_json::to_string_pretty(&status(lab)).unwrap()
        )
    })
}

fn served_by(lab: &Lab, count: usize) -> Vec<String> {
    lab.in_host("client", || {
        (0..count)
            .map(|_| whoami(lab.vip(0), 6443).unwrap().0)
            .collect()
    })
    .unwrap()
}

fn apiserver_setup(backends: &[&str]) -> (Lab, Vec<LabProcess>, LabProcess, std::path::PathBuf) {
    let lab = Lab::new(&HOSTS).unwrap();
    let apis = start_apiservers(&lab, backends);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, backends));
    let agent = start_agent(&lab, "lb", &config, &[]);
    // Every backend has been checked at least once.
    lab.wait_until(Duration::from_secs(10), "first checks", || {
        status(&lab)["vips"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["checks"].as_u64().unwrap() > 0)
    })
    .unwrap();
    (lab, apis, agent, config)
}

#[test]
fn a_killed_apiserver_is_out_within_fall_fast_intervals_plus_one_interval() {
    let (lab, apis, _agent, _) = apiserver_setup(&["api1", "api2", "api3"]);
    let (interval, fast, fall) = (Duration::from_secs(1), Duration::from_millis(200), 3);
    let bound = fast * fall + interval;
    let vip = lab.vip(0);
    let attempts: Mutex<Vec<(Instant, Result<String, String>)>> = Mutex::new(Vec::new());
    let killed_at = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            lab.in_host("client", || {
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(6) {
                    let at = Instant::now();
                    let result = whoami(vip, 6443)
                        .map(|(name, _)| name)
                        .map_err(|e| e.to_string());
                    attempts.lock().unwrap().push((at, result));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .unwrap()
        });
        std::thread::sleep(Duration::from_millis(1300));
        apis[1].signal(Signal::SIGKILL).unwrap();
        let killed_at = Instant::now();
        client.join().unwrap();
        killed_at
    });
    let attempts = attempts.into_inner().unwrap();
    let before: Vec<_> = attempts.iter().filter(|(at, _)| *at < killed_at).collect();
    assert!(
        before.iter().all(|(_, r)| r.is_ok()),
        "failures before the kill"
    );
    let last_failure = attempts
        .iter()
        .filter(|(at, r)| *at >= killed_at && r.is_err())
        .map(|(at, _)| *at)
        .max();
    let recovery = last_failure.map_or(Duration::ZERO, |at| at.duration_since(killed_at));
    let failed = attempts.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!(
        "measured: new connections all succeed again {:.0} ms after the kill (bound {} ms); {failed} of {} attempts failed",
        recovery.as_secs_f64() * 1000.0,
        bound.as_millis(),
        attempts.len()
    );
    assert!(
        recovery <= bound,
        "recovery took {recovery:?}, more than fall x fast_interval + interval = {bound:?}"
    );
    let after: Vec<_> = attempts
        .iter()
        .filter(|(at, _)| *at > killed_at + recovery)
        .collect();
    assert!(after.len() > 50);
    assert!(
        after
            .iter()
            .all(|(_, r)| matches!(r, Ok(name) if name != "api2")),
        "a new connection failed or went to the dead apiserver"
    );
    let dead = backend(&status(&lab), &lab, "api2").unwrap().clone();
    assert_eq!(dead["state"], "down", "{dead}");
    assert_eq!(dead["last_check"]["detail"], "connection refused", "{dead}");
}

#[test]
fn a_not_ready_apiserver_drains_keeps_established_flows_and_returns_after_rise() {
    let (lab, apis, agent, _) = apiserver_setup(&["api1", "api2", "api3"]);
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = Session::to(vip, "api1");
        apis[0].signal(Signal::SIGUSR1).unwrap(); // /readyz answers 500, everything else serves
        wait_for_state(&lab, "api1", "draining", Duration::from_secs(4));
        let drained = backend(&status(&lab), &lab, "api1").unwrap().clone();
        assert_eq!(drained["last_check"]["detail"], "status 500", "{drained}");
        assert_eq!(drained["last_check"]["result"], "not_ready", "{drained}");
        session.assert_alive(50);
        let served: Vec<String> = (0..100).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(
            served.iter().all(|n| n != "api1"),
            "a new connection went to the draining apiserver"
        );
        session.assert_alive(10);

        let checks_before = backend(&status(&lab), &lab, "api1").unwrap()["checks"]
            .as_u64()
            .unwrap();
        apis[0].signal(Signal::SIGUSR2).unwrap();
        wait_for_state(&lab, "api1", "up", Duration::from_secs(4));
        let checks_after = backend(&status(&lab), &lab, "api1").unwrap()["checks"]
            .as_u64()
            .unwrap();
        assert!(
            checks_after - checks_before >= 2,
            "up after {} checks, rise is 2",
            checks_after - checks_before
        );
        let served: Vec<String> = (0..60).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(
            served.iter().any(|n| n == "api1"),
            "api1 gets new flows again"
        );
        session.assert_alive(10);
    })
    .unwrap();
    let log = agent.log();
    assert!(
        log.contains("backend up -> draining") && log.contains("reason=status 500"),
        "structured transition:\n{log}"
    );
    assert!(log.contains("backend draining -> up"), "{log}");
}

#[test]
fn a_hung_backend_goes_down_by_timeout_without_slowing_other_checks() {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2"]);
    let _hung = lab.start_standin("api3", &["--hang"]).unwrap();
    let mut yaml = vip_config(&lab, &["api1", "api2", "api3"]);
    yaml.vips[0].check.timeout = Duration::from_millis(500);
    let config = write_config(&lab, "config.yaml", &yaml);
    let _agent = start_agent(&lab, "lb", &config, &[]);
    let started = Instant::now();
    let checks = |host| {
        backend(&status(&lab), &lab, host).unwrap()["checks"]
            .as_u64()
            .unwrap()
    };
    let took = wait_for_state(&lab, "api3", "down", Duration::from_secs(6));
    let hung_status = backend(&status(&lab), &lab, "api3").unwrap().clone();
    assert!(
        hung_status["last_check"]["detail"]
            .as_str()
            .unwrap()
            .starts_with("timed out after 500ms"),
        "{hung_status}"
    );
    eprintln!(
        "measured: hung backend down after {:.0} ms",
        took.as_secs_f64() * 1000.0
    );
    // Meanwhile the others kept their 1 s rhythm: about one check per second each.
    let elapsed = started.elapsed().as_secs_f64();
    for host in ["api1", "api2"] {
        let n = checks(host) as f64;
        assert!(
            n >= elapsed.floor(),
            "{host}: {n} checks in {elapsed:.1}s: slowed by the hung backend"
        );
    }
    let served = served_by(&lab, 60);
    assert!(served.iter().all(|n| n != "api3"));
}

#[test]
fn with_every_backend_failing_traffic_still_flows_and_status_says_fail_open() {
    let (lab, apis, agent, _) = apiserver_setup(&["api1", "api2", "api3"]);
    for api in &apis {
        api.signal(Signal::SIGUSR1).unwrap();
    }
    for host in ["api1", "api2", "api3"] {
        wait_for_state(&lab, host, "draining", Duration::from_secs(4));
    }
    let report = status(&lab);
    assert_eq!(report["vips"][0]["fail_open"], true, "{report}");
    let table = lab
        .exec("lb", &[bin_path("ha-user").to_str().unwrap(), "status"])
        .unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("FAIL-OPEN"));
    assert!(agent.log().contains("FAILING OPEN"), "{}", agent.log());
    let served = served_by(&lab, 60);
    for name in ["api1", "api2", "api3"] {
        assert!(
            served.iter().any(|n| n == name),
            "fail open spreads over all backends: {served:?}"
        );
    }
    apis[0].signal(Signal::SIGUSR2).unwrap();
    wait_for_state(&lab, "api1", "up", Duration::from_secs(4));
    assert_eq!(status(&lab)["vips"][0]["fail_open"], false);
    assert!(served_by(&lab, 30).iter().all(|n| n == "api1"));
}

/// Fail open leaves out the dead: every apiserver answers /readyz with 500
/// (fail open engages), then one process dies outright. Once its check has
/// it down (3 s after its death, as the issue that asked for it measured),
/// 0 of 60 new connections are refused and none goes to it; the others keep
/// serving though not ready. Before, the dead one kept its full share
/// (18 of 60 refused).
#[test]
fn failing_open_leaves_out_a_backend_that_died() {
    let (lab, apis, agent, _) = apiserver_setup(&["api1", "api2", "api3"]);
    for api in &apis {
        api.signal(Signal::SIGUSR1).unwrap();
    }
    for host in ["api1", "api2", "api3"] {
        wait_for_state(&lab, host, "draining", Duration::from_secs(4));
    }
    assert_eq!(status(&lab)["vips"][0]["fail_open"], true);
    apis[1].signal(Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    wait_for_state(&lab, "api2", "down", Duration::from_secs(4));
    std::thread::sleep(Duration::from_secs(3).saturating_sub(killed.elapsed()));
    assert_eq!(
        status(&lab)["vips"][0]["fail_open"],
        true,
        "still failing open"
    );
    let attempts: Vec<Result<String, String>> = lab
        .in_host("client", || {
            (0..60)
                .map(|_| {
                    whoami(lab.vip(0), 6443)
                        .map(|(name, _)| name)
                        .map_err(|e| e.to_string())
                })
                .collect()
        })
        .unwrap();
    let refused = attempts.iter().filter(|a| a.is_err()).count();
    assert_eq!(refused, 0, "{attempts:?}\n{}", agent.log());
    let served: Vec<&String> = attempts.iter().flatten().collect();
    assert!(served.iter().all(|n| *n != "api2"), "{served:?}");
    for name in ["api1", "api3"] {
        assert!(served.iter().any(|n| *n == name), "{served:?}");
    }
}

/// A keep-alive connection idle on api2 (a client-go watch between events),
/// then api2 is blackholed (its switch port unplugged: nothing in or out).
/// Once the check marks it down (timeouts), what its client sees:
/// `shutdown-sessions` (the default): a reset within the detection time + 1 s,
/// and a new connection through the VIP reaches another backend; `keep`: no
/// word at all while it idles (it would wait for its own keep-alive).
#[test]
fn a_blackholed_backends_idle_connections_are_reset_when_it_is_marked_down() {
    use ha_user::config::OnMarkedDown;
    use std::io::{BufRead, BufReader, Write};
    for on_marked_down in [OnMarkedDown::ShutdownSessions, OnMarkedDown::Keep] {
        let lab = Lab::new(&HOSTS).unwrap();
        let backends = ["api1", "api2", "api3"];
        let _apis = start_apiservers(&lab, &backends);
        let mut conf = vip_config(&lab, &backends);
        let check = &mut conf.vips[0].check;
        check.interval = Duration::from_millis(500);
        check.fast_interval = Duration::from_millis(200);
        check.timeout = Duration::from_millis(300);
        check.fall = 3;
        let detection = check.interval + (check.timeout + check.fast_interval) * check.fall;
        conf.vips[0].on_marked_down = on_marked_down;
        let _agent = start_agent(&lab, "lb", &write_config(&lab, "config.yaml", &conf), &[]);
        let vip = lab.vip(0);
        // A connection on api2, idle.
        let stream = lab
            .in_host("client", || {
                (0..200)
                    .find_map(|_| {
                        let mut stream = std::net::TcpStream::connect((vip, 6443)).unwrap();
                        stream.write_all(b"whoami\n").unwrap();
                        let mut line = String::new();
                        BufReader::new(stream.try_clone().unwrap())
                            .read_line(&mut line)
                            .unwrap();
                        line.starts_with("api2").then_some(stream)
                    })
                    .expect("a connection on api2")
            })
            .unwrap();
        let window = detection + Duration::from_secs(1);
        stream
            .set_read_timeout(Some(window + Duration::from_secs(1)))
            .unwrap();
        lab.set_switch_port("api2", false).unwrap();
        let cut = Instant::now();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let after = cut.elapsed();
        eprintln!(
            "on_marked_down {on_marked_down}: the idle connection's read ended after {after:?} with {read:?} (detection bound {detection:?})"
        );
        match on_marked_down {
            OnMarkedDown::ShutdownSessions => {
                let error = read.expect_err("the connection is reset, not left idle");
                assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
                assert!(after <= window, "reset after {after:?}, bound {window:?}");
                assert!(
                    status(&lab)["conntrack"]["sessions_reset"]
                        .as_u64()
                        .unwrap()
                        >= 1
                );
                // The client reconnects through the VIP, to a live backend.
                let served = served_by(&lab, 10);
                assert!(served.iter().all(|n| n != "api2"), "{served:?}");
            }
            OnMarkedDown::Keep => {
                let error = read.expect_err("nothing comes: the read times out");
                assert!(
                    matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{error}"
                );
                assert_eq!(status(&lab)["conntrack"]["sessions_reset"], 0);
            }
        }
    }
}

/// A reload that changes a VIP's check starts its probes afresh, as up: the
/// tables it writes must say so too, or a backend the old check had taken
/// out would stay out with nothing to bring it back (its new probe reports
/// up, which is no change).
#[test]
fn a_reload_that_changes_the_check_puts_a_backend_the_old_check_took_out_back() {
    let (lab, apis, _agent, config) = apiserver_setup(&["api1", "api2"]);
    apis[0].signal(Signal::SIGUSR1).unwrap();
    wait_for_state(&lab, "api1", "draining", Duration::from_secs(4));
    assert!(served_by(&lab, 20).iter().all(|n| n == "api2"));
    // A TCP check does not look at readiness: api1 passes it.
    let mut next = vip_config(&lab, &["api1", "api2"]);
    next.vips[0].check.kind = Some(ha_user::config::CheckKind::Tcp);
    std::fs::write(&config, next.to_yaml()).unwrap();
    let applied = reload(&lab, "lb").expect("the reload applies");
    assert!(applied.contains("VIPs ~apiserver"), "{applied}");
    wait_for_state(&lab, "api1", "up", Duration::from_secs(4));
    lab.wait_until(Duration::from_secs(5), "api1 takes new flows", || {
        served_by(&lab, 20).iter().any(|n| n == "api1")
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status(&lab)));
    assert_eq!(status(&lab)["vips"][0]["fail_open"], false);
}

#[test]
fn reload_adds_removes_and_reweights_without_breaking_an_unchanged_backend() {
    let (lab, _apis, _agent, config) = apiserver_setup(&["api1", "api2", "api3", "api4"]);
    std::fs::write(
        &config,
        vip_config(&lab, &["api1", "api2", "api3"]).to_yaml(),
    )
    .unwrap();
    let reload = lab
        .exec("lb", &[bin_path("ha-user").to_str().unwrap(), "reload"])
        .unwrap();
    assert!(String::from_utf8_lossy(&reload.stdout).contains("reload applied"));
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = Session::to(vip, "api1");
        session.assert_alive(5);
        let next = config::agent([
            apiserver_vip(&lab, &["api1", "api3", "api4"]).weight(lab.host("api3").addr, 3)
        ]);
        std::fs::write(&config, next.to_yaml()).unwrap();
        let out = lab
            .exec("lb", &[bin_path("ha-user").to_str().unwrap(), "reload"])
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("reload applied"));
        session.assert_alive(50);
        let served: Vec<String> = (0..200).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(
            !served.iter().any(|n| n == "api2"),
            "removed backend got a new flow"
        );
        let api3 = served.iter().filter(|n| *n == "api3").count();
        assert!(
            (90..=150).contains(&api3),
            "weight 3 of 5: api3 served {api3} of 200"
        );
        session.assert_alive(5);

        // A bad file through the CLI: refused, exit 1, nothing changes.
        std::fs::write(&config, "vips: []\n").unwrap();
        let refused = lab
            .command("lb", bin_path("ha-user"))
            .arg("reload")
            .output()
            .unwrap();
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("reload rejected"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
        session.assert_alive(5);
    })
    .unwrap();
    let report = status(&lab);
    let backends: Vec<(String, u64)> = report["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect: Vec<(String, u64)> = [("api1", 1), ("api3", 3), ("api4", 1)]
        .iter()
        .map(|(h, w)| (lab.host(h).addr.to_string(), *w))
        .collect();
    assert_eq!(backends, expect);
}

/// Plan, apply, commit: a step that fails part-way (the second VIP's
/// address, added and then refused, as a netlink error would) puts back
/// everything the reload had changed, the running config goes on serving,
/// and the outcome is counted in `/metrics`.
#[test]
fn a_reload_that_fails_part_way_is_rolled_back_and_counted() {
    reload_failing_at("vip-address-added", "the VIP addresses");
}

/// The same when the failing step is the data plane's (the new tables
/// written, then the last map write refused): the running config's tables
/// are written again.
#[test]
fn a_reload_whose_table_write_fails_is_rolled_back_and_counted() {
    reload_failing_at("data-plane-written", "the data plane's tables");
}

/// A reload that fails at the fault point `point`, whose error names `step`,
/// then the same file applied without the fault.
fn reload_failing_at(point: &str, step: &str) {
    let lab = Lab::new(&HOSTS).unwrap();
    let _apis = start_apiservers(&lab, &["api1", "api2", "api3", "api4"]);
    let config = write_config(&lab, "config.yaml", &vip_config(&lab, &["api1", "api2"]));
    let faults = write_file(&lab, "faults", "");
    let env = format!("HA_LB_FAULTS={}", faults.display());
    let mut agent = lab.spawn_agent("lb", &config, &[], &[&env]).unwrap();
    agent
        .wait_for_log("serving;", Duration::from_secs(15))
        .unwrap();
    let (vip, second_vip) = (lab.vip(0), lab.vip(1));
    let addresses = || {
        String::from_utf8_lossy(
            &lab.exec("lb", &["ip", "-o", "addr", "show"])
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    let managed_neighbours = || {
        String::from_utf8_lossy(&lab.exec("lb", &["ip", "neigh", "show"]).unwrap().stdout)
            .lines()
            .filter(|l| l.contains("managed"))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect::<std::collections::BTreeSet<String>>()
    };
    let reloads = |outcome: &str| {
        let metrics = telemetry(&lab, "lb", "/metrics").1;
        let line = format!("ha_lb_reloads_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("{line} in\n{metrics}"))
            .parse::<u64>()
            .unwrap()
    };
    // api2 out, api3 in, and a second VIP on api4.
    let mut next = vip_config(&lab, &["api1", "api3"]);
    next.vips
        .push(config::vip("second", second_vip, 6443).backends(&[lab.host("api4").addr]));
    std::fs::write(&config, next.to_yaml()).unwrap();
    std::fs::write(&faults, format!("{point}\n")).unwrap();
    let neighbours_before = managed_neighbours();
    lab.in_host("client", || {
        let mut session = Session::open(vip);
        session.assert_alive(3);
        let refused = reload(&lab, "lb").expect_err("the reload fails");
        assert!(
            refused.contains("rolled back") && refused.contains(step),
            "{refused}"
        );
        session.assert_alive(5);
        // The running config's tables are back: no new flow reaches api3.
        let served: Vec<String> = (0..40).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(
            served.iter().all(|n| n == "api1" || n == "api2"),
            "{served:?}"
        );
        assert!(served.iter().any(|n| n == "api2"), "{served:?}");
    })
    .unwrap();
    assert!(
        !addresses().contains(&format!("{second_vip}/")),
        "the second VIP's address was removed again:\n{}",
        addresses()
    );
    assert!(addresses().contains(&format!("{vip}/")));
    // The new backends' neighbour entries go with their data-plane records,
    // which the next sweep (every 10 s) frees: flows might name them.
    lab.wait_until(
        Duration::from_secs(15),
        "the new backends' neighbour entries gone",
        || managed_neighbours() == neighbours_before,
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", managed_neighbours()));
    let report = status(&lab);
    assert_eq!(report["vips"].as_array().unwrap().len(), 1, "{report}");
    let backends: Vec<&str> = report["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    let expect = [
        lab.host("api1").addr.to_string(),
        lab.host("api2").addr.to_string(),
    ];
    assert_eq!(backends, expect);
    assert_eq!((reloads("rolled_back"), reloads("applied")), (1, 0));

    // Without the fault the same file applies whole.
    std::fs::write(&faults, "").unwrap();
    let applied = reload(&lab, "lb").expect("the reload applies");
    assert!(applied.contains("reload applied"), "{applied}");
    assert!(addresses().contains(&format!("{second_vip}/")));
    let served: Vec<String> = lab
        .in_host("client", || {
            (0..40).map(|_| whoami(vip, 6443).unwrap().0).collect()
        })
        .unwrap();
    assert!(
        served.iter().all(|n| n == "api1" || n == "api3"),
        "{served:?}"
    );
    let second = lab
        .in_host("client", || whoami(second_vip, 6443).unwrap().0)
        .unwrap();
    assert_eq!(second, "api4");
    assert_eq!(
        (
            reloads("applied"),
            reloads("rolled_back"),
            reloads("rejected")
        ),
        (1, 1, 0)
    );
}

#[test]
fn drain_and_undrain_from_the_command_line() {
    let (lab, _apis, _agent, _) = apiserver_setup(&["api1", "api2", "api3"]);
    let ha_user = bin_path("ha-user");
    let api1 = lab.host("api1").addr.to_string();
    let vip = lab.vip(0);
    lab.in_host("client", || {
        let mut session = Session::to(vip, "api1");
        let out = lab
            .exec(
                "lb",
                &[ha_user.to_str().unwrap(), "drain", "apiserver", &api1],
            )
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("maintenance"));
        assert_eq!(state_of(&lab, "api1"), "maintenance");
        let served: Vec<String> = (0..100).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(
            served.iter().all(|n| n != "api1"),
            "a drained backend got a new flow"
        );
        session.assert_alive(20);
        lab.exec(
            "lb",
            &[
                ha_user.to_str().unwrap(),
                "undrain",
                "apiserver",
                &format!("{api1}:6443"),
            ],
        )
        .unwrap();
        assert_eq!(state_of(&lab, "api1"), "up");
        let served: Vec<String> = (0..60).map(|_| whoami(vip, 6443).unwrap().0).collect();
        assert!(served.iter().any(|n| n == "api1"));
    })
    .unwrap();
    let wrong = lab
        .command("lb", &ha_user)
        .args(["drain", "apiserver", "10.9.9.9"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("has no backend 10.9.9.9"));
}

#[test]
fn status_json_reports_vip_backends_checks_and_counters() {
    let (lab, _apis, _agent, _) = apiserver_setup(&["api1", "api2"]);
    served_by(&lab, 20);
    let report = status(&lab);
    assert_eq!(report["interface"], "eth0");
    assert_eq!(report["xdp_mode"], "native");
    let vip = &report["vips"][0];
    assert_eq!(vip["name"], "apiserver");
    assert_eq!(vip["address"], lab.vip(0).to_string());
    assert_eq!(
        (
            vip["port"].as_u64(),
            vip["mode"].as_str(),
            vip["owner"].as_str()
        ),
        (Some(6443), Some("nat"), Some("static"))
    );
    assert_eq!(vip["traffic"]["flows"].as_u64(), Some(20));
    let mut flows = 0;
    for b in vip["backends"].as_array().unwrap() {
        assert_eq!(b["state"], "up");
        assert_eq!(b["last_check"]["result"], "pass");
        assert_eq!(b["last_check"]["detail"], "status 200");
        assert!(b["last_check"]["latency_ms"].as_f64().unwrap() > 0.0);
        flows += b["traffic"]["flows"].as_u64().unwrap();
    }
    assert_eq!(flows, 20);
    assert!(report["verdicts"]["forward_tx"].as_u64().unwrap() >= 20 * 3);
}

#[test]
fn the_telemetry_endpoint_answers_probes_and_scrapes() {
    let (lab, apis, _agent, _) = apiserver_setup(&["api1", "api2"]);
    assert_eq!(telemetry(&lab, "lb", "/livez"), (200, "ok\n".to_string()));
    assert_eq!(telemetry(&lab, "lb", "/readyz"), (200, "ok\n".to_string()));
    assert_eq!(telemetry(&lab, "lb", "/nope").0, 404);
    served_by(&lab, 10);
    let up = |host: &str| {
        format!(
            "ha_lb_backend_up{{vip=\"apiserver\",backend=\"{}:6443\"}}",
            lab.host(host).addr
        )
    };
    let (code, metrics) = telemetry(&lab, "lb", "/metrics");
    assert_eq!(code, 200);
    for line in [
        format!("{} 1", up("api1")),
        format!("{} 1", up("api2")),
        "ha_lb_vip_flows_total{vip=\"apiserver\"} 10".to_string(),
        "ha_lb_ready 1".to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    // A backend down is the balancer working, not the agent failing: the
    // scrape shows it, the probes stay green.
    drop(apis);
    wait_for_state(&lab, "api1", "down", Duration::from_secs(10));
    wait_for_state(&lab, "api2", "down", Duration::from_secs(10));
    let metrics = telemetry(&lab, "lb", "/metrics").1;
    assert!(
        metrics.lines().any(|l| l == format!("{} 0", up("api2"))),
        "{metrics}"
    );
    assert!(metrics.contains("ha_lb_vip_fail_open{vip=\"apiserver\"} 1"));
    assert_eq!(telemetry(&lab, "lb", "/readyz").0, 200);
}

#[test]
fn the_admin_socket_refuses_users_other_than_root() {
    let (lab, _apis, agent, _) = apiserver_setup(&["api1"]);
    let ha_user = bin_path("ha-user");
    let as_nobody = lab
        .command("lb", "setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&ha_user)
        .args(["status", "--iface", "eth0"])
        .output()
        .unwrap();
    assert!(
        !as_nobody.status.success(),
        "nobody read the status: {}",
        String::from_utf8_lossy(&as_nobody.stdout)
    );
    lab.wait_until(Duration::from_secs(5), "the refusal logged", || {
        agent.log().contains("refused a client")
    })
    .unwrap();
    assert_eq!(
        status(&lab)["vips"][0]["name"],
        "apiserver",
        "root still can"
    );
}
