//! Benchmark part 2: client -> VIP -> three nginx backends in the lab, the
//! same workloads through ha-lb (XDP, full NAT), haproxy (`mode tcp`,
//! `balance roundrobin`) and nftables (DNAT + masquerade), one after the
//! other on the same LB host in one run, so the ratios hold on a noisy
//! machine.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use ha_lab::{HOST_IFACE, Lab, LabError, LabProcess, nginx};

use crate::BenchError;

const WEBS: [&str; 3] = ["web1", "web2", "web3"];
const PORT: u16 = 80;

type Result<T> = std::result::Result<T, BenchError>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balancer {
    HaLb,
    Haproxy,
    Nftables,
    /// No balancer: the client talks to one backend (web1) itself. The
    /// ceiling of this machine, not a like-for-like rival: one backend
    /// instead of three, and no LB host on the way.
    Direct,
}

impl Balancer {
    pub const ALL: [Balancer; 4] = [
        Balancer::HaLb,
        Balancer::Haproxy,
        Balancer::Nftables,
        Balancer::Direct,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Balancer::HaLb => "ha-lb (XDP, full NAT)",
            Balancer::Haproxy => "haproxy 2.6 (mode tcp, roundrobin)",
            Balancer::Nftables => "nftables (DNAT + masquerade)",
            Balancer::Direct => "direct, no balancer (client to one backend)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct E2eResult {
    pub balancer: Balancer,
    /// New connection per request (wrk with `Connection: close`).
    pub connections_per_second: f64,
    /// Keep-alive requests (wrk default).
    pub keepalive_requests_per_second: f64,
    /// At a fixed moderate rate of new connections, one request each.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The whole machine's CPU seconds (every namespace: client, LB,
    /// backends) per 100,000 requests, for each wrk workload.
    pub cpu_seconds_per_100k_close: f64,
    pub cpu_seconds_per_100k_keepalive: f64,
}

/// Durations of one run.
#[derive(Clone, Copy, Debug)]
pub struct E2eEffort {
    pub seconds: u32,
    pub latency_rate: u32,
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| {
        BenchError::Lab(LabError::Io {
            context: context.to_string(),
            source,
        })
    }
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io("writing a benchmark config"))
}

fn start_nginx(lab: &Lab, host: &str) -> Result<LabProcess> {
    Ok(nginx::start_server(lab, host, PORT, 8192, |_| {
        " backlog=8192; keepalive_requests 100000; location / { return 200 \"ok\\n\"; }".to_string()
    })?)
}

/// Machine-wide busy CPU time (all CPUs), from /proc/stat.
fn cpu_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    busy / 100.0
}

/// Runs wrk from the client; returns (requests per second, requests, CPU seconds).
fn wrk(lab: &Lab, vip: Ipv4Addr, seconds: u32, close: bool) -> Result<(f64, f64, f64)> {
    let url = format!("http://{vip}:{PORT}/");
    let duration = format!("{seconds}s");
    let mut argv = vec![
        "wrk",
        "-t",
        "2",
        "-c",
        "64",
        "-d",
        &duration,
        "--timeout",
        "2s",
    ];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(&url);
    let before = cpu_busy_seconds();
    let output = lab.exec("client", &argv)?;
    let cpu = cpu_busy_seconds() - before;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let requests = text
        .lines()
        .find_map(|l| {
            l.split_once(" requests in ")
                .map(|(n, _)| n.trim().parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0);
    Ok((rps, requests, cpu))
}

/// New connections at `rate` per second for `seconds`, one GET each:
/// the latency of each, connect to last byte.
fn latencies(lab: &Lab, vip: Ipv4Addr, rate: u32, seconds: u32) -> Result<Vec<Duration>> {
    let target = SocketAddr::from((vip, PORT));
    let request = format!("GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n");
    let result = lab.in_host("client", || {
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let start = Instant::now();
        let mut latencies = Vec::new();
        let mut next = start;
        while start.elapsed() < Duration::from_secs(seconds as u64) {
            let began = Instant::now();
            let answered = (|| -> std::io::Result<()> {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                stream.write_all(request.as_bytes())?;
                let mut response = Vec::new();
                stream.read_to_end(&mut response)?;
                Ok(())
            })();
            if answered.is_ok() {
                latencies.push(began.elapsed());
            }
            next += interval;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        latencies
    })?;
    Ok(result)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Sets `balancer` up on the lb host; the returned guard (a process, if
/// any) keeps it running. `undo` tears it down.
fn start_balancer(lab: &Lab, balancer: Balancer) -> Result<Option<LabProcess>> {
    let vip = lab.vip(0);
    let webs: Vec<Ipv4Addr> = WEBS.iter().map(|w| lab.host(w).addr).collect();
    match balancer {
        Balancer::HaLb => {
            let mut yaml = format!(
                "vips:\n  - name: web\n    address: {vip}\n    port: {PORT}\n    check: {{type: http, path: /}}\n    backends:\n"
            );
            for web in &webs {
                yaml.push_str(&format!("      - address: {web}\n"));
            }
            let path = lab.log_dir().join("bench-ha-lb.yaml");
            write_file(&path, &yaml)?;
            Ok(Some(lab.start_agent("lb", &path, &["--no-pin"])?))
        }
        Balancer::Haproxy => {
            lab.exec(
                "lb",
                &["ip", "addr", "add", &format!("{vip}/32"), "dev", HOST_IFACE],
            )?;
            let mut cfg = format!(
                "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend fe\n  bind {vip}:{PORT}\n  default_backend be\nbackend be\n  balance roundrobin\n"
            );
            for (i, web) in webs.iter().enumerate() {
                cfg.push_str(&format!(
                    "  server web{} {web}:{PORT} check inter 1s\n",
                    i + 1
                ));
            }
            let path = lab.log_dir().join("haproxy.cfg");
            write_file(&path, &cfg)?;
            let process = lab.spawn("lb", &["haproxy", "-db", "-f", path.to_str().unwrap()])?;
            let target = SocketAddr::from((vip, PORT));
            lab.wait_until(Duration::from_secs(10), "haproxy listening", || {
                lab.in_host("client", || {
                    TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
                })
                .unwrap_or(false)
            })
            .map_err(|_| {
                LabError::Timeout(
                    Duration::from_secs(10),
                    format!("haproxy to listen; it says:\n{}", process.log()),
                )
            })?;
            Ok(Some(process))
        }
        Balancer::Direct => Ok(None),
        Balancer::Nftables => {
            lab.exec(
                "lb",
                &["ip", "addr", "add", &format!("{vip}/32"), "dev", HOST_IFACE],
            )?;
            lab.exec("lb", &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects; echo 0 > /proc/sys/net/ipv4/conf/eth0/send_redirects"])?;
            let map: Vec<String> = webs
                .iter()
                .enumerate()
                .map(|(i, w)| format!("{i} : {w}"))
                .collect();
            let set: Vec<String> = webs.iter().map(|w| w.to_string()).collect();
            let rules = format!(
                "table ip lbnat {{\n\
                 \x20 chain pre {{\n\
                 \x20   type nat hook prerouting priority -100;\n\
                 \x20   ip daddr {vip} tcp dport {PORT} dnat to numgen inc mod 3 map {{ {} }}\n\
                 \x20 }}\n\
                 \x20 chain post {{\n\
                 \x20   type nat hook postrouting priority 100;\n\
                 \x20   ip daddr {{ {} }} tcp dport {PORT} masquerade\n\
                 \x20 }}\n\
                 }}\n",
                map.join(", "),
                set.join(", ")
            );
            let path = lab.log_dir().join("lbnat.nft");
            write_file(&path, &rules)?;
            lab.exec("lb", &["nft", "-f", path.to_str().unwrap()])?;
            Ok(None)
        }
    }
}

fn stop_balancer(lab: &Lab, balancer: Balancer, guard: Option<LabProcess>) -> Result<()> {
    if let Some(mut process) = guard {
        process.stop(Duration::from_secs(5))?;
    }
    let vip = format!("{}/32", lab.vip(0));
    match balancer {
        Balancer::HaLb | Balancer::Direct => {}
        Balancer::Haproxy => {
            lab.exec("lb", &["ip", "addr", "del", &vip, "dev", HOST_IFACE])?;
        }
        Balancer::Nftables => {
            lab.exec("lb", &["nft", "delete table ip lbnat"])?;
            lab.exec("lb", &["ip", "addr", "del", &vip, "dev", HOST_IFACE])?;
            lab.exec(
                "lb",
                &["sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward"],
            )?;
        }
    }
    Ok(())
}

/// Runs every workload through every balancer.
pub fn run(effort: E2eEffort, mut progress: impl FnMut(&str)) -> Result<Vec<E2eResult>> {
    let lab = Lab::new(&["client", "lb", "web1", "web2", "web3"])?;
    // The client reuses TIME_WAIT ports and has the whole port range: new-connection
    // workloads would otherwise run out of ports within seconds.
    lab.exec("client", &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse; echo '1024 65535' > /proc/sys/net/ipv4/ip_local_port_range"])?;
    let _webs: Vec<LabProcess> = WEBS
        .iter()
        .map(|w| start_nginx(&lab, w))
        .collect::<Result<_>>()?;
    let mut results = Vec::new();
    for balancer in Balancer::ALL {
        progress(&format!("end to end: {}", balancer.label()));
        let vip = match balancer {
            Balancer::Direct => lab.host(WEBS[0]).addr,
            _ => lab.vip(0),
        };
        let guard = start_balancer(&lab, balancer)?;
        // Warm up (ARP, first checks) before measuring.
        let _ = latencies(&lab, vip, 50, 1)?;
        // Latency at a moderate rate first: after a burst of hundreds of
        // thousands of connections, reused NAT ports meet the backends'
        // TIME_WAIT sockets and the tail reflects that instead (docs/benchmarks.md).
        let mut samples = latencies(&lab, vip, effort.latency_rate, effort.seconds)?;
        samples.sort();
        let (cps, close_requests, close_cpu) = wrk(&lab, vip, effort.seconds, true)?;
        let (rps, keepalive_requests, keepalive_cpu) = wrk(&lab, vip, effort.seconds, false)?;
        stop_balancer(&lab, balancer, guard)?;
        results.push(E2eResult {
            balancer,
            connections_per_second: cps,
            keepalive_requests_per_second: rps,
            p50_ms: percentile(&samples, 0.50),
            p99_ms: percentile(&samples, 0.99),
            cpu_seconds_per_100k_close: close_cpu / close_requests.max(1.0) * 100_000.0,
            cpu_seconds_per_100k_keepalive: keepalive_cpu / keepalive_requests.max(1.0) * 100_000.0,
        });
    }
    Ok(results)
}
