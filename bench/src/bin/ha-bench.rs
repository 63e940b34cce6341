//! `cargo xtask bench`: measures and writes docs/benchmarks.md.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use ha_bench::{self as bench, Effort};

#[derive(Parser)]
#[command(about = "ha-lb benchmarks")]
struct Args {
    /// A brief run of every part (a smoke test of the harness, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Where to write the Markdown report.
    #[arg(long, default_value = "docs/benchmarks.md")]
    output: PathBuf,
    /// Where to draw the end-to-end chart (PNG).
    #[arg(long, default_value = "docs/benchmarks.png")]
    chart: PathBuf,
    /// Measure only the per-packet cost of each path and print its table
    /// (writes no report): for comparing two builds of the data path.
    #[arg(long)]
    per_packet_only: bool,
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
    // The first non-empty line each tool prints about its version.
    let version = |argv: &[&str]| {
        std::process::Command::new(argv[0])
            .args(&argv[1..])
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|_| format!("{} not found", argv[0]))
    };
    format!(
        "Linux {} on {cores} x {cpu}; {}; {}; {}; {}",
        kernel.trim(),
        version(&["haproxy", "-v"]),
        version(&["keepalived", "--version"]),
        version(&["nginx", "-v"]),
        version(&["wrk", "--version"]),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let effort = if args.quick {
        Effort::QUICK
    } else {
        Effort::FULL
    };
    if args.per_packet_only {
        let costs = bench::per_packet_only(effort).context("benchmark")?;
        let mut table = String::new();
        bench::cost_table(&mut table, &costs);
        print!("{table}");
        return Ok(());
    }
    let report = bench::run(effort, |part| eprintln!("bench: {part}")).context("benchmark")?;
    bench::chart::draw(&report.e2e, &args.chart)
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", args.chart.display()))?;
    let mut text = bench::render(&report, effort, &machine());
    let chart_name = args
        .chart
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    text = text.replacen(
        "## 4. Scale",
        &format!("![end to end]({chart_name})\n\n## 4. Scale"),
        1,
    );
    if args.quick {
        text.insert_str(0, "<!-- quick mode: a smoke test of the harness; these numbers are not measurements -->\n");
    }
    std::fs::write(&args.output, &text)
        .with_context(|| format!("writing {}", args.output.display()))?;
    print!("{text}");
    Ok(())
}
