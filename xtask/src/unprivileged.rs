//! The first step of `cargo xtask test` (as root): shows that the workspace
//! builds and its unit tests pass where a contributor starts, with stable Rust
//! only, no bpf-linker, no root and no XDP object.
//!
//! How:
//!
//! - **A dedicated user**, `ha-lb-ci` (a system user with its own group and
//!   home `/var/lib/ha-lb-ci`), created once, idempotently. Its home keeps the
//!   user's `CARGO_HOME` (crates fetched from crates.io by that user, a cache
//!   like root's `~/.cargo/registry`) and, during a run, a work directory
//!   `run-<pid>`, removed at the end (and at the next run if a run was killed).
//! - **The sources without `target/`**: the files git knows (tracked, and
//!   untracked ones not ignored, so a new file counts) are copied into the work
//!   directory and handed to the user; `target/` is ignored, so no XDP object
//!   comes along and `ha-user`'s build embeds the stub.
//! - **The stable toolchain alone**: root's toolchains live under
//!   `/root/.rustup`, which the user cannot reach (`/root` is 0700, and stays
//!   so). Each command runs in a private mount namespace where the stable
//!   toolchain's directory is bind-mounted read-only into the work directory;
//!   then the process drops to the user (no supplementary groups, no
//!   capabilities left) and runs `cargo` from there with an environment built
//!   from scratch: `PATH` is that toolchain's `bin` and the system's, so no
//!   rustup, no nightly, no `~/.cargo/bin` (bpf-linker). The mount dies with
//!   the process.
//!
//! It runs `cargo check --workspace --locked` and `cargo test -p ha-user --lib
//! --locked` (with the stub: the test that loading fails with
//! `DataPlaneError::NoXdpObject`). `HA_SKIP_UNPRIVILEGED=1` skips it, for
//! local iteration; CI runs it.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::run as run_command;

/// The user the step runs as.
const USER: &str = "ha-lb-ci";
/// Its home: its cargo cache and the work directories.
const HOME: &str = "/var/lib/ha-lb-ci";
/// Set to 1 to skip the step (local iteration only).
pub const SKIP_ENV: &str = "HA_SKIP_UNPRIVILEGED";

/// Whether `HA_SKIP_UNPRIVILEGED` asks to skip the step.
pub fn skipped() -> bool {
    std::env::var_os(SKIP_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The step: see the module's documentation. Needs root (it creates the user
/// and mounts).
pub fn run(root: &Path) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "xtask: unprivileged step: `cargo check --workspace` and `cargo test -p ha-user --lib` as \
         user {USER}, on a copy of the sources without target/ (no XDP object), with the stable \
         toolchain only (no nightly, no bpf-linker). {SKIP_ENV}=1 skips it."
    );
    let user = ensure_user()?;
    let toolchain = stable_toolchain()?;
    eprintln!(
        "xtask: unprivileged step: user {USER} (uid {}, gid {}), toolchain {}",
        user.uid,
        user.gid,
        toolchain.display()
    );
    sweep_stale_work_dirs(&user.home)?;
    let work = WorkDir::create(&user)?;
    let sources = work.path.join("src");
    let copied = copy_sources(root, &sources)?;
    let mount_point = work.path.join("toolchain");
    std::fs::create_dir(&mount_point)
        .with_context(|| format!("creating {}", mount_point.display()))?;
    let cargo_home = user.home.join("cargo-home");
    std::fs::create_dir_all(&cargo_home)
        .with_context(|| format!("creating {}", cargo_home.display()))?;
    chown_tree(&user.home, user.uid, user.gid, false)?;
    chown_tree(&work.path, user.uid, user.gid, true)?;
    chown_tree(&cargo_home, user.uid, user.gid, false)?;
    eprintln!(
        "xtask: unprivileged step: copied {copied} files into {}; the stable toolchain is \
         mounted read-only at {} for each command",
        sources.display(),
        mount_point.display()
    );

    let as_user = |program: &Path, args: &[&str]| -> Result<Command> {
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(&sources)
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/bin:/usr/bin:/bin",
                    mount_point.join("bin").display()
                ),
            )
            .env("RUSTC", mount_point.join("bin/rustc"))
            .env("RUSTDOC", mount_point.join("bin/rustdoc"))
            .env("HOME", &user.home)
            .env("USER", USER)
            .env("LOGNAME", USER)
            .env("CARGO_HOME", &cargo_home)
            .env("CARGO_TARGET_DIR", work.path.join("target"))
            // A one-off build: no incremental state, no debug info (faster).
            .env("CARGO_INCREMENTAL", "0")
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("CARGO_PROFILE_TEST_DEBUG", "0");
        for name in [
            "CI",
            "TERM",
            "CARGO_TERM_COLOR",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
            "ALL_PROXY",
            "all_proxy",
        ] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        drop_to_user(&mut command, &toolchain, &mount_point, &user)?;
        Ok(command)
    };

    let cargo = mount_point.join("bin/cargo");
    // Who and what the commands run as.
    run_command(&mut as_user(Path::new("/usr/bin/id"), &[])?)
        .context("`id` as the unprivileged user")?;
    run_command(&mut as_user(&cargo, &["--version"])?)
        .context("the stable cargo as the unprivileged user")?;
    run_command(&mut as_user(&cargo, &["check", "--workspace", "--locked"])?)
        .context("`cargo check --workspace` as an unprivileged user without the XDP object")?;
    run_command(&mut as_user(
        &cargo,
        &["test", "-p", "ha-user", "--lib", "--locked"],
    )?)
    .context("`cargo test -p ha-user --lib` as an unprivileged user without the XDP object")?;
    drop(work);
    eprintln!(
        "xtask: unprivileged step passed in {:.0?}: the workspace checks and ha-user's unit tests \
         pass without root, nightly, bpf-linker or the XDP object",
        started.elapsed()
    );
    Ok(())
}

/// The user's account, as the passwd database has it.
#[derive(Debug, PartialEq, Eq)]
struct Account {
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// Parses `getent passwd` output: `name:x:uid:gid:gecos:home:shell`.
fn parse_passwd(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.trim_end().split(':').collect();
    if fields.len() != 7 {
        return None;
    }
    Some(Account {
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
        home: PathBuf::from(fields[5]),
    })
}

fn lookup_user() -> Result<Option<Account>> {
    let output = Command::new("getent")
        .args(["passwd", USER])
        .output()
        .context("running getent passwd")?;
    // Exit status 2: no such user.
    if !output.status.success() {
        return Ok(None);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    parse_passwd(&line)
        .map(Some)
        .with_context(|| format!("unexpected passwd entry for {USER}: {line}"))
}

/// The user, created on first use (a system account, its own group, no login shell).
fn ensure_user() -> Result<Account> {
    let account = match lookup_user()? {
        Some(account) => account,
        None => {
            run_command(Command::new("useradd").args([
                "--system",
                "--user-group",
                "--home-dir",
                HOME,
                "--create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "ha-lb CI, builds and unit tests without privileges",
                USER,
            ]))
            .with_context(|| format!("creating the user {USER}"))?;
            eprintln!("xtask: unprivileged step: created the system user {USER}");
            lookup_user()?.with_context(|| format!("{USER} missing after useradd"))?
        }
    };
    if account.uid == 0 {
        bail!("{USER} has uid 0: it must be an unprivileged user");
    }
    std::fs::create_dir_all(&account.home)
        .with_context(|| format!("creating {}", account.home.display()))?;
    Ok(account)
}

/// The stable toolchain's directory (its sysroot), under root's rustup home.
fn stable_toolchain() -> Result<PathBuf> {
    let output = Command::new("rustup")
        .args(["run", "stable", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("running `rustup run stable rustc --print sysroot`")?;
    if !output.status.success() {
        bail!(
            "finding the stable toolchain: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let sysroot = sysroot
        .canonicalize()
        .with_context(|| format!("resolving {}", sysroot.display()))?;
    if !sysroot.join("bin/cargo").exists() {
        bail!(
            "the stable toolchain at {} has no bin/cargo",
            sysroot.display()
        );
    }
    Ok(sysroot)
}

/// `run-<pid>` under the user's home; removed (as root) when dropped, also
/// when the step fails.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create(user: &Account) -> Result<Self> {
        let path = user.home.join(format!("run-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => eprintln!("xtask: unprivileged step: removed {}", self.path.display()),
            Err(e) => eprintln!(
                "xtask: unprivileged step: could not remove {}: {e}",
                self.path.display()
            ),
        }
    }
}

/// Removes the work directories of runs that no longer live (killed before
/// their cleanup), so repeated runs leave nothing behind.
fn sweep_stale_work_dirs(home: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(home) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", home.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("run-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        eprintln!(
            "xtask: unprivileged step: removing {} (left by a run that ended early)",
            entry.path().display()
        );
        std::fs::remove_dir_all(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
    }
    Ok(())
}

/// Copies the files git knows (tracked, and untracked ones not ignored: so
/// never `target/`) into `to`, keeping modes and symlinks. Returns how many.
fn copy_sources(root: &Path, to: &Path) -> Result<usize> {
    let output = Command::new("git")
        .current_dir(root)
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .context("running git ls-files")?;
    if !output.status.success() {
        bail!(
            "git ls-files in {}: {}",
            root.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut copied = 0;
    for name in output.stdout.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let relative = Path::new(std::ffi::OsStr::from_bytes(name));
        let from = root.join(relative);
        let dest = to.join(relative);
        let metadata = match std::fs::symlink_metadata(&from) {
            Ok(metadata) => metadata,
            // Deleted in the work tree, not yet in the index.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(&from)?;
            std::os::unix::fs::symlink(&target, &dest)
                .with_context(|| format!("creating the symlink {}", dest.display()))?;
        } else if metadata.is_file() {
            std::fs::copy(&from, &dest)
                .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
        } else {
            // A submodule's directory: the workspace has none.
            continue;
        }
        copied += 1;
    }
    Ok(copied)
}

/// Hands `path` (and with `recursive`, everything under it) to the user.
fn chown_tree(path: &Path, uid: u32, gid: u32, recursive: bool) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))?;
    if recursive && std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid, true)?;
        }
    }
    Ok(())
}

/// Makes `command` start in a private mount namespace with `toolchain`
/// bind-mounted read-only at `mount_point`, then as the user: no
/// supplementary groups, its gid, its uid (which leaves no capabilities).
fn drop_to_user(
    command: &mut Command,
    toolchain: &Path,
    mount_point: &Path,
    user: &Account,
) -> Result<()> {
    let source = CString::new(toolchain.as_os_str().as_bytes())?;
    let target = CString::new(mount_point.as_os_str().as_bytes())?;
    let (uid, gid) = (user.uid, user.gid);
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let hook = move || -> std::io::Result<()> {
        // SAFETY: plain syscalls between fork and exec, with pointers to
        // NUL-terminated strings that live in this closure; nothing allocates.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted here propagates back to the host's namespace.
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
        }
        Ok(())
    };
    // SAFETY: the hook only makes syscalls (async-signal-safe) and touches
    // no lock or allocator.
    unsafe {
        command.pre_exec(hook);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_entries_parse() {
        assert_eq!(
            parse_passwd("ha-lb-ci:x:998:997:ha-lb CI:/var/lib/ha-lb-ci:/usr/sbin/nologin\n"),
            Some(Account {
                uid: 998,
                gid: 997,
                home: PathBuf::from("/var/lib/ha-lb-ci"),
            })
        );
        assert_eq!(parse_passwd("ha-lb-ci:x:998"), None);
        assert_eq!(parse_passwd("ha-lb-ci:x:a:997:::"), None);
    }
}
