//! Benchmark part 3: failover, ha-lb against what it replaces. A trial
//! runs in a fresh lab; the client connects through the VIP every 10 ms and
//! the figure is the time from the event until every new connection
//! succeeds again (the start of the first attempt after the last failure,
//! so a failed attempt counts whole, its timeout included); the median of
//! the trials is reported.
//!
//! - A backend (apiserver) is killed: ha-lb's checks at their defaults
//!   against haproxy's (`check`: inter 2s, rise 2, fall 3).
//! - The master LB host dies (its link is cut, the same for every stack):
//!   ha-lb's VRRP at its defaults (100 ms adverts) against keepalived +
//!   haproxy with keepalived at its defaults (version 2, `advert_int 1`)
//!   and at its fastest (version 3, `advert_int 0.01`).
//!
//! Beside the timing client, a patient one opens a connection every 10 ms
//! (each in its own thread) and waits up to 3 s for it, as a real client's
//! connect timeout would: its failures are the client connections the event
//! cost (a SYN that ha-lb's data path redispatches is answered on the
//! client's first retransmission, 1 s later, and is not a failure).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use ha_lab::{HOST_IFACE, Lab, LabError, LabProcess};

use crate::BenchError;

type Result<T> = std::result::Result<T, BenchError>;

const APIS: [&str; 3] = ["api1", "api2", "api3"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    BackendKilledHaLb,
    BackendKilledHaproxy,
    MasterDiesHaLb,
    MasterDiesKeepalivedDefaults,
    MasterDiesKeepalivedFastest,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::BackendKilledHaLb,
        Scenario::BackendKilledHaproxy,
        Scenario::MasterDiesHaLb,
        Scenario::MasterDiesKeepalivedDefaults,
        Scenario::MasterDiesKeepalivedFastest,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::BackendKilledHaLb => {
                "backend killed: ha-lb (https /readyz, 1s / 200ms, rise 2, fall 3)"
            }
            Scenario::BackendKilledHaproxy => {
                "backend killed: haproxy 2.6 defaults (check inter 2s, rise 2, fall 3)"
            }
            Scenario::MasterDiesHaLb => "LB master dies: ha-lb VRRP defaults (v3, 100 ms adverts)",
            Scenario::MasterDiesKeepalivedDefaults => {
                "LB master dies: keepalived 2.2 defaults (v2, advert_int 1) + haproxy"
            }
            Scenario::MasterDiesKeepalivedFastest => {
                "LB master dies: keepalived fastest (v3, advert_int 0.01) + haproxy"
            }
        }
    }

    /// How long to watch after the event.
    fn window(self) -> Duration {
        match self {
            Scenario::BackendKilledHaproxy | Scenario::MasterDiesKeepalivedDefaults => {
                Duration::from_secs(12)
            }
            _ => Duration::from_secs(4),
        }
    }
}

#[derive(Clone, Debug)]
pub struct FailoverResult {
    pub scenario: Scenario,
    pub trials: Vec<Duration>,
    pub failed_attempts: Vec<usize>,
    /// The patient client's failed connections, per trial.
    pub failed_connections: Vec<usize>,
}

impl FailoverResult {
    pub fn median(&self) -> Duration {
        let mut sorted = self.trials.clone();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    pub fn median_failed(&self) -> usize {
        median_count(&self.failed_attempts)
    }

    /// The patient client's failed connections, median over the trials.
    pub fn median_failed_connections(&self) -> usize {
        median_count(&self.failed_connections)
    }
}

fn median_count(counts: &[usize]) -> usize {
    let mut sorted = counts.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

/// How long the patient client waits for a connection and an answer.
const PATIENT: Duration = Duration::from_secs(3);

/// One connection of the patient client: connected and answered within [`PATIENT`].
fn whoami_patient(vip: Ipv4Addr) -> bool {
    whoami_within(vip, PATIENT, PATIENT)
}

/// One connection of the timing client: connected within 200 ms, answered within 500 ms.
fn whoami(vip: Ipv4Addr) -> bool {
    whoami_within(vip, Duration::from_millis(200), Duration::from_millis(500))
}

/// A connection to `vip`:6443 connected within `connect` and answered
/// (a line back for `whoami`) within `read`.
fn whoami_within(vip: Ipv4Addr, connect: Duration, read: Duration) -> bool {
    (|| -> std::io::Result<()> {
        let stream = TcpStream::connect_timeout(&SocketAddr::from((vip, 6443)), connect)?;
        stream.set_read_timeout(Some(read))?;
        (&stream).write_all(b"whoami\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        if line.is_empty() {
            Err(std::io::Error::other("closed"))
        } else {
            Ok(())
        }
    })()
    .is_ok()
}

fn write(lab: &Lab, name: &str, text: &str) -> Result<std::path::PathBuf> {
    let path = lab.log_dir().join(name);
    std::fs::write(&path, text).map_err(|source| {
        BenchError::Lab(LabError::Io {
            context: format!("writing {name}"),
            source,
        })
    })?;
    Ok(path)
}

fn backends_yaml(lab: &Lab) -> String {
    let mut yaml = format!(
        "vips:\n  - name: apiserver\n    address: {}\n    port: 6443\n    backends:\n",
        lab.vip(0)
    );
    for api in APIS {
        yaml.push_str(&format!("      - address: {}\n", lab.host(api).addr));
    }
    yaml
}

/// haproxy on `host`, `mode tcp` roundrobin over the apiservers, bound to
/// every address (the VIP floats in with keepalived).
fn haproxy(lab: &Lab, host: &str) -> Result<LabProcess> {
    let mut cfg = "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                   frontend fe\n  bind *:6443\n  default_backend be\nbackend be\n  balance roundrobin\n"
        .to_string();
    for api in APIS {
        cfg.push_str(&format!(
            "  server {api} {}:6443 check\n",
            lab.host(api).addr
        ));
    }
    let path = write(lab, &format!("haproxy-{host}.cfg"), &cfg)?;
    Ok(lab.spawn(
        host,
        &["haproxy", "-db", "-f", path.to_str().expect("UTF-8")],
    )?)
}

fn keepalived(
    lab: &Lab,
    host: &str,
    peer: &str,
    priority: u8,
    fastest: bool,
) -> Result<LabProcess> {
    let (version, interval) = if fastest { (3, "0.01") } else { (2, "1") };
    Ok(lab.start_keepalived(host, peer, priority, version, interval)?)
}

fn holds_vip(lab: &Lab, host: &str) -> bool {
    lab.exec(host, &["ip", "-o", "-4", "addr", "show", "dev", HOST_IFACE])
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(&format!("{}/32", lab.vip(0))))
        .unwrap_or(false)
}

/// One trial: set up, wait until steady, trigger, measure.
fn trial(scenario: Scenario) -> Result<(Duration, usize, usize)> {
    let lab = Lab::new(&["client", "lb1", "lb2", "api1", "api2", "api3"])?;
    let mut apis: Vec<LabProcess> = APIS
        .iter()
        .map(|api| lab.start_standin(api, &[]))
        .collect::<std::result::Result<_, _>>()?;
    let mut keep: Vec<LabProcess> = Vec::new();
    let vip = lab.vip(0);
    match scenario {
        Scenario::BackendKilledHaLb => {
            let config = write(&lab, "lb1.yaml", &backends_yaml(&lab))?;
            keep.push(lab.start_agent("lb1", &config, &["--no-pin"])?);
        }
        Scenario::BackendKilledHaproxy => {
            lab.exec(
                "lb1",
                &["ip", "addr", "add", &format!("{vip}/32"), "dev", HOST_IFACE],
            )?;
            keep.push(haproxy(&lab, "lb1")?);
        }
        Scenario::MasterDiesHaLb => {
            for (lb, priority) in [("lb1", 150), ("lb2", 100)] {
                let yaml = format!(
                    "{}vrrp:\n  vrid: 51\n  priority: {priority}\n",
                    backends_yaml(&lab)
                );
                let config = write(&lab, &format!("{lb}.yaml"), &yaml)?;
                keep.push(lab.start_agent(lb, &config, &["--no-pin"])?);
            }
        }
        Scenario::MasterDiesKeepalivedDefaults | Scenario::MasterDiesKeepalivedFastest => {
            let fastest = scenario == Scenario::MasterDiesKeepalivedFastest;
            for (lb, peer, priority) in [("lb1", "lb2", 150), ("lb2", "lb1", 100)] {
                keep.push(haproxy(&lab, lb)?);
                keep.push(keepalived(&lab, lb, peer, priority, fastest)?);
            }
        }
    }
    // Steady: lb1 serves and every connection succeeds.
    lab.wait_until(Duration::from_secs(15), "lb1 serving the VIP", || {
        holds_vip(&lab, "lb1")
            && lab
                .in_host("client", || (0..5).all(|_| whoami(vip)))
                .unwrap_or(false)
    })?;
    std::thread::sleep(Duration::from_millis(1500));

    let attempts = Mutex::new(Vec::new());
    let patient = Mutex::new(Vec::new());
    let event_at = std::thread::scope(|scope| -> Result<Instant> {
        let patient_client = scope.spawn(|| {
            lab.in_host("client", || {
                // Threads spawned here inherit the client's network namespace.
                std::thread::scope(|inner| {
                    let start = Instant::now();
                    while start.elapsed() < scenario.window() + Duration::from_millis(500) {
                        inner.spawn(|| {
                            let at = Instant::now();
                            let ok = whoami_patient(vip);
                            patient.lock().expect("lock").push((at, ok));
                        });
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
        });
        let client = scope.spawn(|| {
            lab.in_host("client", || {
                let start = Instant::now();
                while start.elapsed() < scenario.window() + Duration::from_millis(500) {
                    let at = Instant::now();
                    let ok = whoami(vip);
                    attempts.lock().expect("lock").push((at, ok));
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        let at = Instant::now();
        match scenario {
            Scenario::BackendKilledHaLb | Scenario::BackendKilledHaproxy => {
                apis[1].signal(nix::sys::signal::Signal::SIGKILL)?
            }
            _ => lab.set_switch_port("lb1", false)?,
        }
        client.join().expect("client thread")?;
        patient_client.join().expect("patient client thread")?;
        Ok(at)
    })?;
    apis.clear();
    let attempts = attempts.into_inner().expect("lock");
    let after: Vec<&(Instant, bool)> = attempts.iter().filter(|(at, _)| *at >= event_at).collect();
    let failed = after.iter().filter(|(_, ok)| !ok).count();
    // When the unbroken run of successes began: the start of the first attempt
    // after the last failure (a failed attempt counts whole, its timeout included).
    let last_failure = after.iter().rposition(|(_, ok)| !ok);
    let recovered = match last_failure {
        None => Duration::ZERO,
        Some(i) => after
            .get(i + 1)
            .map_or(scenario.window(), |(at, _)| at.duration_since(event_at)),
    };
    let failed_connections = patient
        .into_inner()
        .expect("lock")
        .iter()
        .filter(|(at, ok)| *at >= event_at && !ok)
        .count();
    Ok((recovered, failed, failed_connections))
}

pub fn run(trials: u32, mut progress: impl FnMut(&str)) -> Result<Vec<FailoverResult>> {
    let mut results = Vec::new();
    for scenario in Scenario::ALL {
        progress(&format!("failover: {}", scenario.label()));
        let mut result = FailoverResult {
            scenario,
            trials: Vec::new(),
            failed_attempts: Vec::new(),
            failed_connections: Vec::new(),
        };
        for _ in 0..trials {
            let (took, failed, failed_connections) = trial(scenario)?;
            result.trials.push(took);
            result.failed_attempts.push(failed);
            result.failed_connections.push(failed_connections);
        }
        results.push(result);
    }
    Ok(results)
}
