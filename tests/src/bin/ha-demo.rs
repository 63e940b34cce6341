//! `cargo xtask demo`: a client, an LB host running `ha-user attach`, and
//! three stand-in apiservers on one LAN of network namespaces. The client
//! keeps opening connections to VIP:6443; the demo shows which apiserver
//! served them and the XDP program's per-backend counters, then kills one
//! apiserver and restarts it, showing each step in `ha-user status`.

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

fn show_status(lab: &Lab) -> Result<()> {
    let out = lab.exec("lb", &[bin_path("ha-user").to_str().unwrap(), "status"])?;
    println!("\n$ ha-user status");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).context("building the lab")?;
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

    let mut config =
        format!("vips:\n  - name: apiserver\n    address: {vip}\n    port: 6443\n    backends:\n");
    for name in APISERVERS {
        config.push_str(&format!("      - address: {}\n", lab.host(name).addr));
    }
    let config_path = lab.log_dir().join("config.yaml");
    std::fs::write(&config_path, &config)?;
    println!(
        "\nconfig ({}): health checks default to HTTPS GET /readyz, 1s/200ms, rise 2, fall 3\n{config}",
        config_path.display()
    );

    let ha_user = bin_path("ha-user");
    let mut agent = lab.spawn(
        "lb",
        &[
            ha_user.to_str().unwrap(),
            "attach",
            "--iface",
            HOST_IFACE,
            "--config",
            config_path.to_str().unwrap(),
            "--stats-interval",
            "1s",
        ],
    )?;
    agent.wait_for_log("serving", Duration::from_secs(15))?;
    for line in agent.log().lines().filter(|l| l.contains("INFO")) {
        println!(
            "agent: {}",
            line.split_once("INFO")
                .map_or(line, |(_, rest)| rest)
                .trim()
        );
    }
    std::thread::sleep(Duration::from_millis(1200)); // first health checks

    println!(
        "\n== 1. steady: client {} -> VIP {vip}:6443, {} new connections/s",
        lab.host("client").addr,
        args.rate
    );
    traffic(&lab, &agent, &args)?;
    show_status(&lab)?;

    println!("\n== 2. kill -9 api2: its checks fail (connection refused), it leaves the table");
    let killed = Instant::now();
    apiservers[1].signal(Signal::SIGKILL)?;
    traffic(&lab, &agent, &args)?;
    let transitions: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains("backend up -> down"))
        .map(str::to_string)
        .collect();
    for line in &transitions {
        println!(
            "agent: {}",
            line.split_once("WARN")
                .map_or(line.as_str(), |(_, rest)| rest)
                .trim()
        );
    }
    println!("  (killed {:.1}s ago)", killed.elapsed().as_secs_f32());
    show_status(&lab)?;

    println!("\n== 3. api2 restarts: back after 2 passing checks");
    apiservers[1] = start_apiserver(&lab, "api2")?;
    traffic(&lab, &agent, &args)?;
    show_status(&lab)?;

    agent.stop(Duration::from_secs(5))?;
    let addresses = lab.exec("lb", &["ip", "-o", "-4", "addr", "show", "dev", HOST_IFACE])?;
    let link = lab.exec("lb", &["ip", "-d", "link", "show", HOST_IFACE])?;
    let vip_left = String::from_utf8_lossy(&addresses.stdout).contains(&format!("{vip}/32"));
    let xdp_left = String::from_utf8_lossy(&link.stdout).contains("prog/xdp");
    println!(
        "\nagent stopped (SIGTERM): VIP address {}, XDP program {}",
        if vip_left {
            "STILL PRESENT (bug)"
        } else {
            "removed"
        },
        if xdp_left {
            "STILL ATTACHED (bug)"
        } else {
            "detached"
        }
    );
    drop(apiservers);
    println!("lab torn down");
    Ok(())
}
