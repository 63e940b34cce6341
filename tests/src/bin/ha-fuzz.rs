//! `cargo xtask fuzz --packets N --seed S`: the differential fuzzer (the XDP
//! program against the reference model, docs/data-path.md). Exits 1 on a
//! divergence, after printing the minimal case and writing it as a fixture.

use std::{path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ha_lab::fuzz;

#[derive(Parser)]
#[command(about = "Differential fuzzer: the XDP program against the reference model")]
struct Args {
    /// Frames to send through both, over all workers.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Seed of the case generator (the same seed runs the same cases).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Workers, each with its own lab on its own CPU (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Where a diverging case is written as a JSON fixture.
    #[arg(long, default_value = "target/fuzz-divergences")]
    out_dir: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args.workers.unwrap_or(cpus).clamp(1, cpus);
    let per_worker = args.packets.div_ceil(workers as u64);
    eprintln!(
        "fuzz: seed {}, {} packets over {workers} worker(s) on CPUs 0..{workers}",
        args.seed, args.packets
    );
    let started = Instant::now();
    let results: Vec<Result<fuzz::Report>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|cpu| {
                let out_dir = args.out_dir.clone();
                let seed = args.seed;
                scope.spawn(move || {
                    fuzz::campaign(per_worker, seed, cpu, Some(&out_dir), |r| {
                        eprintln!(
                            "fuzz: worker {cpu}: {} packets in {} cases, {:.0} s",
                            r.packets,
                            r.cases,
                            r.elapsed.as_secs_f64()
                        );
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut packets = 0;
    let mut cases = 0;
    let mut coverage = fuzz::Coverage::default();
    let mut diverged = false;
    for (cpu, result) in results.into_iter().enumerate() {
        let report = result.with_context(|| format!("worker {cpu}"))?;
        packets += report.packets;
        cases += report.cases;
        coverage.merge(&report.coverage);
        if let Some((fixture, trace, written)) = &report.divergence {
            diverged = true;
            println!(
                "DIVERGENCE (worker {cpu}), minimal case of {} steps:",
                fixture.steps.len()
            );
            println!("{trace}");
            if let Some(path) = written {
                println!("written to {}", path.display());
            }
        }
    }
    println!(
        "paths reached (count over all cases):\n{}",
        coverage.render()
    );
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "fuzz: seed {}: {packets} packets in {cases} cases, {elapsed:.0} s ({:.0} packets/s), {} divergences",
        args.seed,
        packets as f64 / elapsed,
        u32::from(diverged)
    );
    if diverged {
        std::process::exit(1);
    }
    Ok(())
}
