//! Long-running processes inside lab hosts, stopped when their handle drops.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{LabError, Result, io_error};

static SPAWNED: AtomicU32 = AtomicU32::new(0);

/// A process running in a lab host. stdout and stderr go to one log file, which
/// tests read to wait for a line and which is printed if the test fails.
pub struct LabProcess {
    child: Child,
    label: String,
    log_path: PathBuf,
}

impl LabProcess {
    pub(crate) fn spawn(mut command: Command, log_dir: &Path, label: &str) -> Result<LabProcess> {
        let sequence = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let log_path = log_dir.join(format!("{label}-{sequence}.log"));
        let log = File::create(&log_path)
            .map_err(io_error(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_error(format!("duplicating {}", log_path.display())))?;
        // `ip netns exec` execs the program in place, so the child's pid is the program's.
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io_error(format!("spawning {label}")))?;
        Ok(LabProcess {
            child,
            label: label.to_string(),
            log_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .map_err(|e| io_error(format!("sending {signal} to {}", self.label))(e.into()))
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; fails early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LabError::Command {
                    command: self.label.clone(),
                    status: status.to_string(),
                    stderr: format!("exited before logging {needle:?}; log:\n{}", self.log()),
                });
            }
            if start.elapsed() > timeout {
                return Err(LabError::Timeout(
                    timeout,
                    format!("{needle:?} in the log of {}:\n{}", self.label, self.log()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status if the process has ended within `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(io_error(format!("waiting for {}", self.label)))?
            {
                return Ok(Some(status));
            }
            if start.elapsed() > timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return Ok(status);
        }
        let _ = self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .map_err(io_error(format!("waiting for {}", self.label)))
    }
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_secs(2));
    }
}

/// Prints the tail of every log in `dir`; used when a test fails.
pub(crate) fn dump_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!("----- {} (last {} lines)", path.display(), tail.len());
        for line in tail {
            eprintln!("{line}");
        }
    }
}
