//! `cargo xtask demo`: a client, two LB hosts running `ha-user attach` with
//! VRRP, and three stand-in apiservers on one LAN of network namespaces.
//! The client keeps opening connections to VIP:6443; the demo shows which
//! apiserver served them and the XDP program's per-backend counters, kills
//! an apiserver and restarts it, then kills the master LB's agent (the other
//! LB takes the VIP over) and restarts it (it takes the VIP back), showing
//! each step in `ha-user status`.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use ha_lab::{HOST_IFACE, Lab, LabProcess, bin_path};
use nix::sys::signal::Signal;

#[derive(Parser)]
#[command(about = "ha-lb demo on a network-namespace lab")]
struct Args {
    /// How long each phase (steady, one apiserver dead, recovered) lasts.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    phase: Duration,
    /// New connections per second from the client.
    #[arg(long, default_value_t = 50)]
    rate: u32,
}

const APISERVERS: [&str; 3] = ["api1", "api2", "api3"];

fn whoami(vip: Ipv4Addr) -> std::io::Result<String> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::from((vip, 6443)), Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    (&stream).write_all(b"whoami\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.split_whitespace().next().unwrap_or("?").to_string())
}

fn start_apiserver(lab: &Lab, name: &str) -> Result<LabProcess> {
    Ok(lab.start_standin(name, &[])?)
}

/// Connects for `duration`, printing every second who served and the agent's counters.
fn traffic(lab: &Lab, agent: &LabProcess, args: &Args) -> Result<()> {
    let vip = lab.vip(0);
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    lab.in_host("client", || {
        let start = Instant::now();
        let mut served: BTreeMap<String, u64> = BTreeMap::new();
        let (mut failed, mut next_report) = (0u64, Duration::from_secs(1));
        while start.elapsed() < args.phase {
            match whoami(vip) {
                Ok(name) => *served.entry(name).or_default() += 1,
                Err(_) => failed += 1,
            }
            std::thread::sleep(interval);
            if start.elapsed() >= next_report {
                next_report += Duration::from_secs(1);
                let spread: Vec<String> = served.iter().map(|(n, c)| format!("{n}={c}")).collect();
                println!(
                    "  {:>3.0}s client: served by {}  failed={failed}",
                    start.elapsed().as_secs_f32(),
                    spread.join(" ")
                );
            }
        }
        let log = agent.log();
        let stats: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("stats backend="))
            .collect();
        for line in &stats[stats.len().saturating_sub(APISERVERS.len())..] {
            println!(
                "       agent (XDP counters, since start): {}",
                line.trim_start_matches("stats ")
            );
        }
    })?;
    Ok(())
}

fn show_status(lab: &Lab, lb: &str) -> Result<()> {
    let out = lab.exec(lb, &[bin_path("ha-user").to_str().unwrap(), "status"])?;
    println!("\n{lb}$ ha-user status");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

fn start_agent(lab: &Lab, lb: &str, config: &std::path::Path) -> Result<LabProcess> {
    Ok(lab.start_agent(lb, config, &["--stats-interval", "1s"])?)
}

fn print_events(agent: &LabProcess, needles: &[&str], who: &str) {
    for line in agent
        .log()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
    {
        let text = ["INFO", "WARN", "ERROR"]
            .iter()
            .find_map(|level| line.split_once(level))
            .map_or(line, |(_, rest)| rest);
        println!("  {who}: {}", text.trim());
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let lab =
        Lab::new(&["client", "lb1", "lb2", "api1", "api2", "api3"]).context("building the lab")?;
    let vip = lab.vip(0);
    println!(
        "lab {}: one LAN (a bridge in namespace hl{}-sw), every host on eth0:",
        lab.slot(),
        lab.slot()
    );
    for host in lab.hosts() {
        println!("  {:<7} {:<15} {}", host.name, host.addr, host.mac_string());
    }
    let mut apiservers: Vec<LabProcess> = APISERVERS
        .iter()
        .map(|n| start_apiserver(&lab, n))
        .collect::<Result<_>>()?;

    let mut configs = Vec::new();
    for (lb, priority) in [("lb1", 150), ("lb2", 100)] {
        let mut config = format!(
            "vips:\n  - name: apiserver\n    address: {vip}\n    port: 6443\n    backends:\n"
        );
        for name in APISERVERS {
            config.push_str(&format!("      - address: {}\n", lab.host(name).addr));
        }
        config.push_str(&format!(
            "vrrp:\n  vrid: 51\n  priority: {priority}\n  advert_interval: 100ms\n"
        ));
        let path = lab.log_dir().join(format!("{lb}.yaml"));
        std::fs::write(&path, &config)?;
        if lb == "lb1" {
            println!(
                "\nlb1 config ({}); lb2's differs in priority (100). Checks default to HTTPS GET /readyz, 1s/200ms, rise 2, fall 3\n{config}",
                path.display()
            );
        }
        configs.push(path);
    }
    let lb1 = start_agent(&lab, "lb1", &configs[0])?;
    let lb2 = start_agent(&lab, "lb2", &configs[1])?;
    std::thread::sleep(Duration::from_millis(1500)); // election and first health checks
    print_events(&lb1, &["XDP program attached", "VRRP", "VIPs taken"], "lb1");
    print_events(&lb2, &["VRRP"], "lb2");

    println!(
        "\n== 1. steady: client {} -> VIP {vip}:6443 on lb1 (VRRP master), {} new connections/s",
        lab.host("client").addr,
        args.rate
    );
    traffic(&lab, &lb1, &args)?;
    show_status(&lab, "lb1")?;

    println!("\n== 2. kill -9 api2: its checks fail (connection refused), it leaves the table");
    apiservers[1].signal(Signal::SIGKILL)?;
    traffic(&lab, &lb1, &args)?;
    print_events(&lb1, &["backend up -> down"], "lb1");
    show_status(&lab, "lb1")?;

    println!("\n== 3. api2 restarts: back after 2 passing checks");
    apiservers[1] = start_apiserver(&lab, "api2")?;
    traffic(&lab, &lb1, &args)?;
    show_status(&lab, "lb1")?;

    println!(
        "\n== 4. kill -9 the agent on lb1: lb2 hears no adverts for 3 x 100 ms + skew and takes the VIP"
    );
    lb1.signal(Signal::SIGKILL)?;
    let killed = Instant::now();
    traffic(&lab, &lb2, &args)?;
    print_events(&lb2, &["VRRP backup -> master", "VIPs taken"], "lb2");
    println!(
        "  (lb1's agent was killed {:.1}s ago)",
        killed.elapsed().as_secs_f32()
    );
    show_status(&lab, "lb2")?;

    println!("\n== 5. lb1's agent restarts: it outranks lb2 (150 > 100) and takes the VIP back");
    drop(lb1);
    let lb1 = start_agent(&lab, "lb1", &configs[0])?;
    traffic(&lab, &lb1, &args)?;
    print_events(&lb1, &["VRRP", "VIPs taken"], "lb1");
    print_events(&lb2, &["VRRP master -> backup", "VIPs released"], "lb2");
    show_status(&lab, "lb1")?;

    for (name, mut agent) in [("lb1", lb1), ("lb2", lb2)] {
        agent.stop(Duration::from_secs(5))?;
        let addresses = lab.exec(name, &["ip", "-o", "-4", "addr", "show", "dev", HOST_IFACE])?;
        let link = lab.exec(name, &["ip", "-d", "link", "show", HOST_IFACE])?;
        let vip_left = String::from_utf8_lossy(&addresses.stdout).contains(&format!("{vip}/32"));
        let xdp_left = String::from_utf8_lossy(&link.stdout).contains("prog/xdp");
        println!(
            "\n{name} agent stopped (SIGTERM): VIP address {}, XDP program {}",
            if vip_left {
                "STILL PRESENT (bug)"
            } else {
                "absent"
            },
            if xdp_left {
                "STILL ATTACHED (bug)"
            } else {
                "detached"
            }
        );
    }
    drop(apiservers);
    println!("lab torn down");
    Ok(())
}
