//! `ha-user`: the ha-lb agent and its command line.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ha_common::{ProtoCounter, ProtoIndex};
use ha_user::dataplane::{AttachMode, DataPlane};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "ha-user",
    version,
    about = "ha-lb: XDP load balancer for the Kubernetes control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to an interface and run until SIGTERM or SIGINT.
    Attach {
        /// Interface that receives the VIP's traffic.
        #[arg(long)]
        iface: String,
        /// XDP attach mode; `auto` tries native first and falls back to generic.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// Print the data plane's per-protocol counters this often (0s: never).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        stats_interval: Duration,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Attach {
            iface,
            xdp_mode,
            stats_interval,
        } => runtime.block_on(attach(&iface, xdp_mode, stats_interval)),
    }
}

async fn attach(iface: &str, xdp_mode: AttachMode, stats_interval: Duration) -> Result<()> {
    let mut dataplane = DataPlane::load().context("loading the XDP program")?;
    let mode = dataplane
        .attach(iface, xdp_mode)
        .with_context(|| format!("attaching to interface {iface}"))?;
    info!(%iface, mode = mode.label(), "XDP program attached; running until SIGTERM or SIGINT");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut ticker = (!stats_interval.is_zero()).then(|| tokio::time::interval(stats_interval));

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: detaching"); break; }
            _ = sigint.recv() => { info!("SIGINT: detaching"); break; }
            _ = async { ticker.as_mut().expect("guarded").tick().await }, if ticker.is_some() => {
                let totals = dataplane.proto_counters().context("reading counters")?;
                println!("{}", format_counters(&totals));
            }
        }
    }
    dataplane
        .detach()
        .with_context(|| format!("detaching XDP from {iface}"))?;
    info!(%iface, "detached; exiting");
    Ok(())
}

/// One line of per-protocol totals, stable enough for the demo to show and
/// for tests to parse: `counters tcp=<pkts>/<bytes>B udp=... `.
fn format_counters(totals: &[ProtoCounter]) -> String {
    let mut line = String::from("counters");
    for index in ProtoIndex::ALL {
        let counter = totals[index as usize];
        line.push_str(&format!(
            " {}={}/{}B",
            index.label(),
            counter.packets,
            counter.bytes
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_line_lists_every_protocol_in_index_order() {
        let mut totals = [ProtoCounter::default(); ProtoIndex::COUNT as usize];
        totals[ProtoIndex::Tcp as usize] = ProtoCounter {
            packets: 3,
            bytes: 180,
        };
        assert_eq!(
            format_counters(&totals),
            "counters non-ipv4=0/0B tcp=3/180B udp=0/0B icmp=0/0B other-ipv4=0/0B malformed=0/0B"
        );
    }
}
