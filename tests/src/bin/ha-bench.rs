//! `cargo xtask bench`: measures and writes docs/benchmarks.md.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ha_lab::bench::{self, Effort};

#[derive(Parser)]
#[command(about = "ha-lb benchmarks")]
struct Args {
    /// A brief run of every part (a smoke test of the harness, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Where to write the Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    output: PathBuf,
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("Linux {} on {} x {cpu}", kernel.trim(), cores)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let effort = if args.quick {
        Effort::QUICK
    } else {
        Effort::FULL
    };
    let report = bench::run(effort, |part| eprintln!("bench: {part}")).context("benchmark")?;
    let mut text = bench::render(&report, effort, &machine());
    if args.quick {
        text.insert_str(0, "<!-- quick mode: a smoke test of the harness; these numbers are not measurements -->\n");
    }
    std::fs::write(&args.output, &text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    print!("{text}");
    Ok(())
}
