//! The differential fuzzer: generated packet sequences through the XDP
//! program (BPF_PROG_TEST_RUN, on a lab host's real interface) and through
//! the reference model (`ha-model`), compared after every step: verdict,
//! output bytes, the connection and reverse NAT tables, the queue of recent flows
//! and every counter. docs/data-path.md is what both implement;
//! docs/development.md says how to run it and what to do with a divergence.
//!
//! proptest generates the cases and, on a divergence, shrinks the case to a
//! minimal one, which is written as a JSON fixture; `tests/fuzz-fixtures/`
//! holds those that were found and fixed, replayed by `cargo xtask test`.

pub use ha_user::batch;
pub mod steps;
pub mod world;

use std::{
    cell::RefCell,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::{Deserialize, Serialize};

pub use steps::Step;
pub use world::{Coverage, Harness};

/// A minimal case that diverged: the fixture format.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fixture {
    /// What it shows (set when it is kept as a regression).
    pub note: String,
    pub steps: Vec<Step>,
}

/// What a campaign did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub cases: u64,
    pub packets: u64,
    pub steps: u64,
    pub elapsed: Duration,
    /// How often each verdict and event occurred.
    pub coverage: Coverage,
    /// The minimal diverging case, its trace, and where it was written.
    pub divergence: Option<(Fixture, String, Option<PathBuf>)>,
}

/// Runs cases drawn from `seed` on CPU `cpu` until `packets` frames went
/// through both implementations, or a divergence is found (then shrunk,
/// traced and, with `out_dir`, written as a fixture).
///
/// # Errors
/// The lab or the data plane could not be set up.
pub fn campaign(
    packets: u64,
    seed: u64,
    cpu: usize,
    out_dir: Option<&Path>,
    mut progress: impl FnMut(&Report),
) -> anyhow::Result<Report> {
    let harness = RefCell::new(Harness::new(cpu)?);
    let started = Instant::now();
    let mut report = Report::default();
    let mut batch = 0u64;
    while report.packets < packets {
        // Each batch of cases has its own generator seed, derived from the
        // campaign's: the same seed always runs the same cases.
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&batch.to_le_bytes());
        key[16..24].copy_from_slice(&(cpu as u64).to_le_bytes());
        let config = Config {
            cases: 256,
            failure_persistence: None,
            max_shrink_iters: 20_000,
            max_shrink_time: 600_000,
            ..Config::default()
        };
        let mut runner =
            TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
        let counted = RefCell::new((0u64, 0u64, 0u64));
        let outcome = runner.run(&steps::case(), |case| {
            let mut counted = counted.borrow_mut();
            counted.0 += 1;
            counted.1 += Harness::frames(&case) as u64;
            counted.2 += case.len() as u64;
            harness.borrow_mut().run(&case).map_err(TestCaseError::fail)
        });
        let (cases, frames, steps) = counted.into_inner();
        report.cases += cases;
        report.packets += frames;
        report.steps += steps;
        report.elapsed = started.elapsed();
        report.coverage = harness.borrow().coverage.clone();
        match outcome {
            Ok(()) => {}
            Err(TestError::Fail(_, minimal)) => {
                let trace = harness.borrow_mut().trace(&minimal);
                let fixture = Fixture {
                    note: format!("found by seed {seed}, CPU {cpu}, batch {batch}"),
                    steps: minimal,
                };
                let written = match out_dir {
                    Some(dir) => Some(write_fixture(dir, &fixture)?),
                    None => None,
                };
                report.divergence = Some((fixture, trace, written));
                return Ok(report);
            }
            Err(TestError::Abort(why)) => anyhow::bail!("the fuzzer stopped: {why}"),
        }
        progress(&report);
        batch += 1;
    }
    Ok(report)
}

/// Writes a fixture as `<dir>/divergence-<hash>.json`.
fn write_fixture(dir: &Path, fixture: &Fixture) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(fixture)?;
    let name = format!("divergence-{:016x}.json", fnv1a(text.as_bytes()));
    let path = dir.join(name);
    std::fs::write(&path, text + "\n")?;
    Ok(path)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads a fixture file.
///
/// # Errors
/// It cannot be read or parsed.
pub fn read_fixture(path: &Path) -> anyhow::Result<Fixture> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}
