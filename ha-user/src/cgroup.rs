//! Where the socket-level balancer attaches: the root of the cgroup v2
//! hierarchy (docs/data-path.md, "Socket-level balancing").
//!
//! The v2 hierarchy exists in every kernel that has cgroups, mounted or not,
//! and a process that no v2 controller placed anywhere is in its root, so a
//! program attached at the root sees every socket of the host. Where it is
//! mounted depends on the host: pure v2 at `/sys/fs/cgroup`, hybrid (v1
//! controllers, v2 beside them) at `/sys/fs/cgroup/unified`, pure v1 not at
//! all, in which case the agent mounts it at [`PRIVATE_MOUNT`] (as Cilium
//! does at `/run/cilium/cgroupv2`).
//!
//! [`cgroup2_mounts`] and [`choose`] are pure (unit-tested on mountinfo
//! text); [`resolve`] and [`netns_cookie`] are the effects.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::CgroupSetting;

/// Where the agent mounts cgroup2 when no mount of it is visible.
pub const PRIVATE_MOUNT: &str = "/run/ha-lb/cgroupv2";

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h), kernel 5.14+.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/self/mountinfo: {0}")]
    MountInfo(#[source] std::io::Error),
    #[error(
        "no cgroup2 mount is visible and mounting one at {path} failed: {source} (mounting \
         needs CAP_SYS_ADMIN; or mount the host's /sys/fs/cgroup into the agent)"
    )]
    Mount {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup2 mount ({reason})")]
    NotCgroup2 { path: String, reason: String },
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, kernel 5.14+): {0}")]
    NetnsCookie(#[source] std::io::Error),
}

/// A cgroup2 mount as /proc/self/mountinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted (field 5, octal escapes decoded).
    pub mount_point: PathBuf,
    /// The cgroup it shows at its mount point, relative to the reader's
    /// cgroup namespace (field 4): `/` for the hierarchy's root as this
    /// namespace sees it.
    pub root: String,
}

/// Every cgroup2 mount in `mountinfo` (proc(5), /proc/PID/mountinfo), in order.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // The optional fields end at a lone "-", followed by the fs type.
            let separator = fields.iter().position(|f| *f == "-")?;
            if fields.get(separator + 1) != Some(&"cgroup2") || separator < 6 {
                return None;
            }
            Some(Cgroup2Mount {
                mount_point: PathBuf::from(unescape(fields[4])),
                root: unescape(fields[3]),
            })
        })
        .collect()
}

/// Decodes the `\ooo` octal escapes mountinfo writes for space, tab,
/// newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount to attach at, among `mounts`: the first one showing its
/// hierarchy's root (`/`), else the first one (a subtree: the caller checks
/// whether it is the real root), else none (mount one).
pub fn choose(mounts: &[Cgroup2Mount]) -> Option<&Cgroup2Mount> {
    mounts.iter().find(|m| m.root == "/").or(mounts.first())
}

/// How the cgroup directory was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupSource {
    /// Named in the config.
    Configured,
    /// A cgroup2 mount listed in /proc/self/mountinfo.
    Mounted,
    /// None was visible: the agent mounted cgroup2 at [`PRIVATE_MOUNT`].
    MountedByAgent,
}

/// The directory to attach to, and whether it is the hierarchy's real root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedCgroup {
    pub path: PathBuf,
    pub source: CgroupSource,
    /// The hierarchy's root: every process of the host is at or below it.
    /// A cgroup2 root has no `cgroup.events` file (every other cgroup does,
    /// Documentation/admin-guide/cgroup-v2.rst).
    pub is_root: bool,
}

/// Finds (or, for `auto` with nothing mounted, mounts) the cgroup2
/// directory `setting` names, and checks that it is one.
///
/// # Errors
/// [`CgroupError::MountInfo`], [`CgroupError::Mount`] (nothing mounted and
/// mounting failed), [`CgroupError::NotCgroup2`] (a path that is not on a
/// cgroup2 filesystem).
pub fn resolve(setting: &CgroupSetting) -> Result<ResolvedCgroup, CgroupError> {
    let (path, source) = match setting {
        CgroupSetting::Path(path) => (path.clone(), CgroupSource::Configured),
        CgroupSetting::Auto => {
            let mountinfo =
                std::fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
            let mounts = cgroup2_mounts(&mountinfo);
            // The mount that is the real root, else what `choose` says.
            match mounts
                .iter()
                .find(|m| is_hierarchy_root(&m.mount_point))
                .or_else(|| choose(&mounts))
            {
                Some(mount) => (mount.mount_point.clone(), CgroupSource::Mounted),
                None => (mount_private()?, CgroupSource::MountedByAgent),
            }
        }
    };
    check_cgroup2(&path)?;
    Ok(ResolvedCgroup {
        is_root: is_hierarchy_root(&path),
        path,
        source,
    })
}

fn is_hierarchy_root(path: &Path) -> bool {
    path.join("cgroup.procs").exists() && !path.join("cgroup.events").exists()
}

/// Mounts cgroup2 at [`PRIVATE_MOUNT`] (or finds it already mounted there).
fn mount_private() -> Result<PathBuf, CgroupError> {
    let path = PathBuf::from(PRIVATE_MOUNT);
    let error = |source: std::io::Error| CgroupError::Mount {
        path: PRIVATE_MOUNT.to_string(),
        source,
    };
    std::fs::create_dir_all(&path).map_err(error)?;
    if check_cgroup2(&path).is_ok() {
        return Ok(path);
    }
    nix::mount::mount(
        Some("cgroup2"),
        &path,
        Some("cgroup2"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|errno| error(errno.into()))?;
    Ok(path)
}

fn check_cgroup2(path: &Path) -> Result<(), CgroupError> {
    let not = |reason: String| CgroupError::NotCgroup2 {
        path: path.display().to_string(),
        reason,
    };
    let stat = nix::sys::statfs::statfs(path).map_err(|e| not(e.to_string()))?;
    let magic = stat.filesystem_type().0 as i64;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(not(format!("filesystem magic {magic:#x}")));
    }
    Ok(())
}

/// The cookie of the calling thread's network namespace
/// (`getsockopt(SO_NETNS_COOKIE)` on a socket made for it), what
/// `bpf_get_netns_cookie` returns for a socket of that namespace.
///
/// # Errors
/// [`CgroupError::NetnsCookie`]: no socket, or a kernel before 5.14.
pub fn netns_cookie() -> Result<u64, CgroupError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0"))
        .map_err(CgroupError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, into a local u64 of the given length.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(CgroupError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This development VM's (hybrid: v1 controllers, v2 at unified).
    const HYBRID: &str = "\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A systemd host with the unified hierarchy, and a second view of it.
    const PURE_V2: &str = "\
25 1 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:3 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    /// A container in a private cgroup namespace: its own cgroup2 mount
    /// shows `/` (its namespace's root), the host's bind-mounted cgroupfs
    /// shows a path outside it.
    const CONTAINER: &str = "\
700 650 0:24 /../../.. /host/sys/fs/cgroup rw,relatime master:3 - cgroup2 cgroup2 rw
701 650 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
";

    const PURE_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
";

    #[test]
    fn a_hybrid_host_has_it_at_unified() {
        let mounts = cgroup2_mounts(HYBRID);
        assert_eq!(
            mounts,
            vec![Cgroup2Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            }]
        );
        assert_eq!(
            choose(&mounts).unwrap().mount_point,
            Path::new("/sys/fs/cgroup/unified")
        );
    }

    #[test]
    fn a_pure_v2_host_has_it_at_sys_fs_cgroup() {
        let mounts = cgroup2_mounts(PURE_V2);
        assert_eq!(
            choose(&mounts).unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn a_pure_v1_host_has_none_and_the_agent_mounts_it() {
        assert!(cgroup2_mounts(PURE_V1).is_empty());
        assert_eq!(choose(&[]), None);
        // `ip netns exec` gives a fresh sysfs without any cgroup mount.
        assert!(cgroup2_mounts("48 45 0:39 / /sys rw,relatime - sysfs ns rw\n").is_empty());
    }

    #[test]
    fn a_mount_showing_its_root_is_preferred() {
        let mounts = cgroup2_mounts(CONTAINER);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].root, "/../../..");
        // By mountinfo alone the namespace's own mount shows "/"; `resolve`
        // looks for `cgroup.events` first, which the real root lacks.
        assert_eq!(
            choose(&mounts).unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let line = "50 23 0:40 / /run/with\\040space\\134x rw - cgroup2 none rw\n";
        assert_eq!(
            cgroup2_mounts(line)[0].mount_point,
            Path::new("/run/with space\\x")
        );
        // Optional fields (shared:N, master:N) before the separator.
        let line = "50 23 0:40 / /c rw shared:1 master:2 - cgroup2 none rw\n";
        assert_eq!(cgroup2_mounts(line)[0].mount_point, Path::new("/c"));
        // Malformed lines are skipped, not a panic.
        assert!(cgroup2_mounts("- cgroup2\n1 2 - cgroup2\n\n").is_empty());
    }
}
