//! `cargo xtask demo`: builds a lab (a client, an LB host, three stand-in
//! apiservers), runs the agent on the LB host and shows the data plane's
//! counters moving while the client sends ICMP, TCP and UDP to the LB.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use clap::Parser;
use ha_lab::{HOST_IFACE, Lab, bin_path};

#[derive(Parser)]
#[command(about = "ha-lb demo on a network-namespace lab")]
struct Args {
    /// How long to generate traffic and show counters.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).context("building the lab")?;
    println!(
        "lab {} built: bridge in namespace hl{}-sw, hosts:",
        lab.slot(),
        lab.slot()
    );
    for host in lab.hosts() {
        println!(
            "  {:<7} {:<15} {}  (namespace {})",
            host.name,
            host.addr,
            host.mac_string(),
            host.netns
        );
    }

    let standin = bin_path("standin-apiserver");
    let mut apiservers = Vec::new();
    for name in ["api1", "api2", "api3"] {
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
    println!("stand-in apiservers up on api1..3:6443");

    let ha_user = bin_path("ha-user");
    let mut agent = lab.spawn(
        "lb",
        &[
            ha_user.to_str().unwrap(),
            "attach",
            "--iface",
            HOST_IFACE,
            "--stats-interval",
            "1s",
        ],
    )?;
    agent.wait_for_log("XDP program attached", Duration::from_secs(10))?;
    let attach_line = agent
        .log()
        .lines()
        .find(|l| l.contains("XDP program attached"))
        .unwrap_or_default()
        .to_string();
    println!("agent on lb: {}", attach_line.trim());
    println!(
        "client -> lb: ping every 200 ms, a TCP connect to :6443 and a UDP datagram to :5353 every 100 ms\n"
    );

    let _ping = lab.spawn(
        "client",
        &["ping", "-q", "-i", "0.2", &lab.host("lb").addr.to_string()],
    )?;
    let lb = lab.host("lb").addr;
    lab.in_host("client", || -> Result<()> {
        let udp = UdpSocket::bind("0.0.0.0:0")?;
        let start = Instant::now();
        let mut shown = 0;
        while start.elapsed() < args.duration {
            // Nothing listens on the LB: the connect is refused, which is traffic all the same.
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from((lb, 6443)),
                Duration::from_millis(50),
            );
            udp.send_to(b"demo", (lb, 5353))?;
            std::thread::sleep(Duration::from_millis(100));
            let log = agent.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("counters")).collect();
            for line in &lines[shown..] {
                println!("{:>5.1}s  {line}", start.elapsed().as_secs_f32());
            }
            shown = lines.len();
        }
        Ok(())
    })??;

    agent.stop(Duration::from_secs(5))?;
    let xdp_left = lab.exec("lb", &["ip", "link", "show", HOST_IFACE])?;
    let still_attached = String::from_utf8_lossy(&xdp_left.stdout).contains("xdp");
    println!(
        "\nagent stopped with SIGTERM; XDP on lb/{HOST_IFACE}: {}",
        if still_attached {
            "STILL ATTACHED (bug)"
        } else {
            "detached"
        }
    );
    drop(apiservers);
    println!("lab torn down");
    Ok(())
}
