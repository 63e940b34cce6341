//! `cargo xtask`: the project's own build, set-up, test and demo commands.
//!
//! Every command runs `setup` first, so a fresh machine needs nothing but
//! `cargo xtask test` or `cargo xtask demo`.

mod setup;
mod unprivileged;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ha-lb development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: nightly rust-src, bpf-linker, Debian packages. Idempotent.
    Setup,
    /// Build the XDP program for bpfel-unknown-none with the nightly toolchain.
    BuildEbpf {
        #[arg(long)]
        release: bool,
        /// Build the upgrade test's variant instead (a changed constant, so
        /// another program tag) into target/ebpf-variant.
        #[arg(long)]
        variant: bool,
    },
    /// Run every test: format and lint checks, unit tests, BPF_PROG_TEST_RUN and lab tests (root).
    ///
    /// As root it first builds and unit-tests a copy of the sources as an
    /// unprivileged user, with stable Rust only and no XDP object
    /// (HA_SKIP_UNPRIVILEGED=1 skips that step).
    Test {
        /// Only what needs neither root nor the lab nor the XDP object: format
        /// check, clippy, and the unit tests of ha-common, ha-model, ha-user
        /// (--lib) and xtask. Stable Rust is enough.
        #[arg(long)]
        unit: bool,
        /// Extra arguments for `cargo test` (a test name filter, `--nocapture`, ...).
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Only `cargo xtask test`'s first step: as an unprivileged user, on a copy of the
    /// sources without target/, with stable Rust only, `cargo check --workspace` and
    /// `cargo test -p ha-user --lib` (root, to create the user and mount the toolchain).
    Unprivileged,
    /// Measure the data plane and write docs/benchmarks.md (root).
    Bench {
        /// Run every part briefly (a smoke test of the harness).
        #[arg(long)]
        quick: bool,
        /// Measure only the per-packet cost of each path, print it, write nothing.
        #[arg(long)]
        per_packet_only: bool,
    },
    /// Differential fuzzing: generated packet sequences through the XDP program and
    /// the reference model, compared after every packet (root).
    Fuzz {
        /// Frames to send through both.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed of the generator: the same seed runs the same cases.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Workers, each with its own lab on its own CPU (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Build a network-namespace lab and show the load balancer working in it (root).
    Demo {
        /// Arguments for the demo program (for example `--duration 30s`).
        #[arg(last = true)]
        demo_args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(&root),
        Task::BuildEbpf { release, variant } => {
            setup::toolchain(&root)?;
            if variant {
                build_ebpf_variant(&root)
            } else {
                build_ebpf(&root, release)
            }
        }
        Task::Test {
            unit: true,
            cargo_test_args,
        } => unit_test(&root, &cargo_test_args),
        Task::Test {
            unit: false,
            cargo_test_args,
        } => {
            require_root("cargo xtask test")?;
            if unprivileged::skipped() {
                eprintln!(
                    "xtask: skipping the unprivileged step ({}=1)",
                    unprivileged::SKIP_ENV
                );
            } else {
                unprivileged::run(&root)?;
            }
            setup::run(&root)?;
            build_ebpf(&root, true)?;
            build_ebpf_variant(&root)?;
            test(&root, &cargo_test_args)
        }
        Task::Unprivileged => {
            require_root("cargo xtask unprivileged")?;
            unprivileged::run(&root)
        }
        Task::Bench {
            quick,
            per_packet_only,
        } => {
            require_root("cargo xtask bench")?;
            setup::run(&root)?;
            build_ebpf(&root, true)?;
            bench(&root, quick, per_packet_only)
        }
        Task::Fuzz {
            packets,
            seed,
            workers,
        } => {
            require_root("cargo xtask fuzz")?;
            setup::run(&root)?;
            build_ebpf(&root, true)?;
            let mut command = release_binary(&root, "ha-fuzz")?;
            command.args([
                "--packets",
                &packets.to_string(),
                "--seed",
                &seed.to_string(),
            ]);
            if let Some(workers) = workers {
                command.args(["--workers", &workers.to_string()]);
            }
            run(&mut command)
                .context("fuzzing (a divergence is printed above, and written as a fixture)")
        }
        Task::Demo { demo_args } => {
            require_root("cargo xtask demo")?;
            setup::run(&root)?;
            build_ebpf(&root, true)?;
            demo(&root, &demo_args)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "{what} needs root (network namespaces, veth, XDP): run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

/// Runs a command, echoing it first; a non-zero exit is an error naming it.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let rendered = format!("{command:?}").replace('"', "");
    eprintln!("xtask: running {rendered}");
    let status = command
        .status()
        .with_context(|| format!("starting {rendered}"))?;
    if !status.success() {
        bail!("{rendered} failed: {status}");
    }
    Ok(())
}

/// A `cargo` command run in the (stable) workspace root.
fn cargo(root: &Path) -> Command {
    let mut command = Command::new("cargo");
    command.current_dir(root);
    command
}

/// `cargo +nightly <subcommand>` for the XDP crate: bpfel-unknown-none,
/// core built from source, artifacts under target/ebpf.
fn ebpf_cargo(root: &Path, subcommand: &str, release: bool) -> Command {
    ebpf_cargo_in(root, subcommand, release, &root.join("target/ebpf"))
}

fn ebpf_cargo_in(root: &Path, subcommand: &str, release: bool, target_dir: &Path) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(root.join("ha-ebpf"))
        // `cargo xtask` runs under the stable toolchain; these would pin the child to it.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .args([
            "+nightly",
            subcommand,
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        command.arg("--release");
    }
    command
}

/// The upgrade lab's second program: the same source with one constant
/// changed (`HA_EBPF_VARIANT`), so its tag differs. At
/// target/ebpf-variant/bpfel-unknown-none/release/ha-ebpf.
fn build_ebpf_variant(root: &Path) -> Result<()> {
    let mut command = ebpf_cargo_in(root, "build", true, &root.join("target/ebpf-variant"));
    command.env("HA_EBPF_VARIANT", "1");
    run(&mut command).context("building the upgrade test's XDP program variant")
}

fn build_ebpf(root: &Path, release: bool) -> Result<()> {
    run(&mut ebpf_cargo(root, "build", release)).context("building the XDP program (ha-ebpf)")?;
    let profile = if release { "release" } else { "debug" };
    eprintln!(
        "xtask: XDP object at {}",
        root.join("target/ebpf/bpfel-unknown-none")
            .join(profile)
            .join("ha-ebpf")
            .display()
    );
    Ok(())
}

/// Format checks of both workspaces and clippy of this one: stable Rust, no
/// root, no XDP object needed (ha-user embeds a stub without one).
fn lint(root: &Path) -> Result<()> {
    run(cargo(root).args(["fmt", "--all", "--check"]))
        .context("formatting check (run `cargo fmt --all`)")?;
    run(cargo(root)
        .args(["fmt", "--check", "--manifest-path"])
        .arg(root.join("ha-ebpf/Cargo.toml")))
    .context("formatting check of ha-ebpf (run `cargo fmt --manifest-path ha-ebpf/Cargo.toml`)")?;
    run(cargo(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy")
}

/// `cargo xtask test --unit`: what runs without root, the lab or the XDP object.
fn unit_test(root: &Path, cargo_test_args: &[String]) -> Result<()> {
    lint(root)?;
    run(cargo(root)
        .args([
            "test",
            "--no-fail-fast",
            "-p",
            "ha-common",
            "-p",
            "ha-model",
            "-p",
            "xtask",
        ])
        .args(cargo_test_args))
    .context("unit tests of ha-common, ha-model and xtask")?;
    run(cargo(root)
        .args(["test", "--no-fail-fast", "-p", "ha-user", "--lib"])
        .args(cargo_test_args))
    .context("unit tests of ha-user")?;
    eprintln!(
        "xtask: unit tests passed (the BPF_PROG_TEST_RUN, fuzzer and lab suites need root: `cargo xtask test`)"
    );
    Ok(())
}

fn test(root: &Path, cargo_test_args: &[String]) -> Result<()> {
    lint(root)?;
    run(ebpf_cargo(root, "clippy", true).args(["--", "-D", "warnings"]))
        .context("clippy of ha-ebpf")?;
    // Lab tests start the workspace's binaries (ha-user, standin-apiserver).
    run(cargo(root).args(["build", "--workspace", "--bins"]))?;
    run(cargo(root)
        .env("HA_BIN_DIR", root.join("target/debug"))
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_test_args))
    .context("tests")
}

/// Builds the release binaries and returns a command for one of them, run
/// from the workspace root with the others at hand (`HA_BIN_DIR`).
fn release_binary(root: &Path, name: &str) -> Result<Command> {
    run(cargo(root).args([
        "build",
        "--release",
        "-p",
        "ha-user",
        "-p",
        "ha-tests",
        "-p",
        "ha-bench",
        "--bins",
    ]))?;
    let mut command = Command::new(root.join("target/release").join(name));
    command
        .current_dir(root)
        .env("HA_BIN_DIR", root.join("target/release"));
    Ok(command)
}

fn bench(root: &Path, quick: bool, per_packet_only: bool) -> Result<()> {
    let mut command = release_binary(root, "ha-bench")?;
    if per_packet_only {
        command.arg("--per-packet-only");
    }
    if quick {
        // A quick run never overwrites the published report and chart.
        command
            .args(["--quick", "--output"])
            .arg(root.join("target/benchmarks-quick.md"))
            .arg("--chart")
            .arg(root.join("target/benchmarks-quick.png"));
    }
    run(&mut command).context("benchmarks")
}

fn demo(root: &Path, demo_args: &[String]) -> Result<()> {
    run(release_binary(root, "ha-demo")?.args(demo_args)).context("demo")
}
