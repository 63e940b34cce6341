//! `cargo xtask demo`: a client, an LB host running `ha-user attach`, and
//! three stand-in apiservers on one LAN of network namespaces. The client
//! opens connections to VIP:6443; the demo shows which apiserver served each
//! and the agent's live per-backend counters from the XDP program.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use ha_lab::{HOST_IFACE, Lab, bin_path};

#[derive(Parser)]
#[command(about = "ha-lb demo on a network-namespace lab")]
struct Args {
    /// How long the client keeps connecting.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// New connections per second from the client.
    #[arg(long, default_value_t = 50)]
    rate: u32,
}

const APISERVERS: [&str; 3] = ["api1", "api2", "api3"];

fn whoami(vip: Ipv4Addr) -> std::io::Result<String> {
    let stream =
        TcpStream::connect_timeout(&SocketAddr::from((vip, 6443)), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    (&stream).write_all(b"whoami\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim().to_string())
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

    let standin = bin_path("standin-apiserver");
    let mut apiservers = Vec::new();
    for name in APISERVERS {
        let listen = format!("{}:6443", lab.host(name).addr);
        let mut process = lab.spawn(
            name,
            &[
                standin.to_str().unwrap(),
                "--name",
                name,
                "--listen",
                &listen,
            ],
        )?;
        process.wait_for_log("listening", Duration::from_secs(10))?;
        apiservers.push(process);
    }

    let mut config =
        format!("vips:\n  - name: apiserver\n    address: {vip}\n    port: 6443\n    backends:\n");
    for name in APISERVERS {
        config.push_str(&format!("      - address: {}\n", lab.host(name).addr));
    }
    let config_path = lab.log_dir().join("config.yaml");
    std::fs::write(&config_path, &config)?;
    println!("\nconfig ({}):\n{}", config_path.display(), config);

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
    println!(
        "\nclient {} -> VIP {vip}:6443, {} new connections/s for {:?}; each asks `whoami` and closes\n",
        lab.host("client").addr,
        args.rate,
        args.duration
    );

    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    lab.in_host("client", || -> Result<()> {
        let start = Instant::now();
        let mut served: BTreeMap<String, u64> = BTreeMap::new();
        let (mut failed, mut next_report) = (0u64, Duration::from_secs(1));
        let mut shown_stats = 0;
        while start.elapsed() < args.duration {
            match whoami(vip) {
                Ok(reply) => {
                    *served
                        .entry(reply.split_whitespace().next().unwrap_or("?").to_string())
                        .or_default() += 1
                }
                Err(_) => failed += 1,
            }
            std::thread::sleep(interval);
            if start.elapsed() >= next_report {
                next_report += Duration::from_secs(1);
                let spread: Vec<String> = served.iter().map(|(n, c)| format!("{n}={c}")).collect();
                println!(
                    "{:>4.0}s client: served by {}  failed={failed}",
                    start.elapsed().as_secs_f32(),
                    spread.join(" ")
                );
                let log = agent.log();
                let stats: Vec<&str> = log
                    .lines()
                    .filter(|l| l.starts_with("stats backend="))
                    .collect();
                let latest = stats.len().saturating_sub(APISERVERS.len());
                if latest >= shown_stats {
                    for line in &stats[latest..] {
                        println!(
                            "      agent (XDP counters): {}",
                            line.trim_start_matches("stats ")
                        );
                    }
                    shown_stats = stats.len();
                }
            }
        }
        Ok(())
    })??;

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
