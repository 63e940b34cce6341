//! Host settings the agent reads or changes: sysctls and the bpffs pin directory.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use crate::config::PortRange;

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unexpected content {content:?}")]
    Format { path: String, content: String },
    #[error(
        "data_plane.nat.port_range {nat} overlaps net.ipv4.ip_local_port_range {local}: replies to this \
         host's own connections could be taken for NAT replies; choose a NAT range outside it"
    )]
    PortRangeOverlap { nat: PortRange, local: PortRange },
    #[error(
        "interface {iface} is a VLAN device: not supported. XDP runs natively only on the \
         parent interface, and the VIP's address and gratuitous ARP must be on the VLAN the \
         clients are on. Serve the VIP on an untagged interface (a NIC, or a bond), e.g. an \
         access port on that VLAN; tagged frames that reach an untagged interface are served \
         there and answered on their own VLAN, one tag deep, when the NIC passes the tag to \
         XDP (ethtool -K IF rxvlan off rx-vlan-filter off)"
    )]
    VlanDevice { iface: String },
    #[error("mounting bpffs on {path}: {source}")]
    Mount {
        path: String,
        #[source]
        source: nix::Error,
    },
}

type Result<T> = std::result::Result<T, SystemError>;

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| SystemError::Io {
        path: path.to_string(),
        source,
    })
}

fn write(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(|source| SystemError::Io {
        path: path.to_string(),
        source,
    })
}

/// Whether the agent can serve on an interface of this link kind (rtnetlink's
/// name; `None` for a physical NIC).
///
/// # Errors
/// [`SystemError::VlanDevice`] for a VLAN device (802.1Q or 802.1ad).
pub fn check_attach_kind(iface: &str, kind: Option<&str>) -> Result<()> {
    match kind {
        Some("vlan") => Err(SystemError::VlanDevice {
            iface: iface.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The host's ephemeral port range for its own outgoing connections.
pub fn local_port_range() -> Result<PortRange> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let content = read(path)?;
    let mut parts = content.split_whitespace().map(str::parse::<u16>);
    match (parts.next(), parts.next()) {
        (Some(Ok(min)), Some(Ok(max))) => Ok(PortRange { min, max }),
        _ => Err(SystemError::Format {
            path: path.to_string(),
            content,
        }),
    }
}

/// Refuses a NAT port range that overlaps the host's ephemeral ports.
pub fn check_nat_port_range(nat: PortRange) -> Result<()> {
    let local = local_port_range()?;
    if nat.overlaps(&local) {
        return Err(SystemError::PortRangeOverlap { nat, local });
    }
    Ok(())
}

/// IPv4 forwarding on one interface, switched on by the agent:
/// `bpf_fib_lookup` answers only for interfaces that forward. The value
/// before ha-lb comes back on [`ForwardingGuard::release`], and on drop
/// unless a data path that needs forwarding stays (an earlier agent's, or
/// this one's kept for the next).
pub struct ForwardingGuard {
    path: String,
    /// The value before ha-lb switched it on.
    original: String,
    restore_on_drop: bool,
}

impl ForwardingGuard {
    /// Whether the interface still forwards (something else may have switched
    /// it off since): `None` if the sysctl cannot be read.
    pub fn still_on(&self) -> Option<bool> {
        read(&self.path).ok().map(|v| v.trim() == "1")
    }

    /// Whether forwarding was on before ha-lb switched it on.
    pub fn was_on(&self) -> bool {
        self.original == "1"
    }

    /// The value an earlier agent recorded (`Some(false)`: it switched
    /// forwarding on), so that the final release restores the original.
    pub fn remember_original(&mut self, was_on: Option<bool>) {
        if was_on == Some(false) {
            self.original = "0".to_string();
        }
    }

    /// An earlier agent's data path runs and needs forwarding: this guard
    /// never switches it off on its own (a start that fails leaves it on).
    pub fn defer_to_running_data_path(&mut self) {
        self.restore_on_drop = false;
    }

    /// Leaves forwarding on when the guard goes (the keep intent).
    pub fn keep(&mut self) {
        self.restore_on_drop = false;
    }

    /// Puts the original value back (the release intent).
    pub fn release(&mut self) {
        self.restore_on_drop = false;
        self.restore();
    }

    fn restore(&self) {
        if self.original != "1"
            && let Err(e) = write(&self.path, &self.original)
        {
            warn!("restoring {}: {e}", self.path);
        }
    }

    pub fn enable(iface: &str) -> Result<Self> {
        let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
        let original = read(&path)?.trim().to_string();
        if original != "1" {
            write(&path, "1")?;
            info!(%iface, "enabled IPv4 forwarding on the interface (needed by bpf_fib_lookup); restored on release");
        }
        Ok(Self {
            path,
            original,
            restore_on_drop: true,
        })
    }
}

impl Drop for ForwardingGuard {
    fn drop(&mut self) {
        if self.restore_on_drop {
            self.restore();
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Where this agent pins its data path, and whether the pins there outlive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinDir {
    pub path: PathBuf,
    /// False when the agent had to mount bpffs itself outside the host's
    /// mount namespace (as under `ip netns exec`, which gives a fresh /sys):
    /// that mount, and every pin on it, goes with the agent's namespace.
    pub outlives_agent: bool,
}

/// Where this agent pins its data path: `/sys/fs/bpf/ha-lb/<iface>` in the
/// host's own network namespace, `/sys/fs/bpf/ha-lb/netns-<inode>/<iface>`
/// in any other, so agents in several namespaces with the same interface
/// name never share a pin. Mounts bpffs on /sys/fs/bpf if nothing is
/// mounted there.
pub fn pin_dir(iface: &str) -> Result<PinDir> {
    let mounted = ensure_bpffs(Path::new(BPFFS_ROOT))?;
    Ok(PinDir {
        path: pin_dir_path(iface)?,
        outlives_agent: !mounted || in_init_mount_namespace(),
    })
}

/// The path [`pin_dir`] names, without mounting anything (for looking).
pub fn pin_dir_path(iface: &str) -> Result<PathBuf> {
    let own = netns_inode("/proc/self/ns/net")?;
    let init = netns_inode("/proc/1/ns/net").ok();
    let base = Path::new(BPFFS_ROOT).join("ha-lb");
    Ok(if init == Some(own) {
        base.join(iface)
    } else {
        base.join(format!("netns-{own}")).join(iface)
    })
}

fn netns_inode(path: &str) -> Result<u64> {
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| SystemError::Io {
            path: path.to_string(),
            source,
        })
}

/// Mounts bpffs on `path` unless one is there; says whether it mounted.
fn ensure_bpffs(path: &Path) -> Result<bool> {
    let is_bpffs = nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false);
    if is_bpffs {
        return Ok(false);
    }
    std::fs::create_dir_all(path).map_err(|source| SystemError::Io {
        path: path.display().to_string(),
        source,
    })?;
    nix::mount::mount(
        Some("bpffs"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| SystemError::Mount {
        path: path.display().to_string(),
        source,
    })?;
    info!(path = %path.display(), "mounted bpffs");
    Ok(true)
}

/// Whether this process shares PID 1's mount namespace (false when that
/// cannot be read).
fn in_init_mount_namespace() -> bool {
    match (
        std::fs::metadata("/proc/self/ns/mnt"),
        std::fs::metadata("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own.ino() == init.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vlan_devices_are_refused_with_what_to_do_and_other_kinds_accepted() {
        let error = check_attach_kind("eth0.100", Some("vlan"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("eth0.100 is a VLAN device"), "{error}");
        assert!(error.contains("untagged interface"), "{error}");
        for kind in [None, Some("veth"), Some("bond")] {
            assert!(check_attach_kind("eth0", kind).is_ok(), "{kind:?}");
        }
    }
}
