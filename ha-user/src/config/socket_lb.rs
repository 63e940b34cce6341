//! `socket_lb`: socket-level balancing of this host's own connections to
//! the VIPs (docs/data-path.md, "Socket-level balancing").

use std::{fmt, path::PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketLbConfig {
    /// Balance connect() and sendmsg() to a VIP from this host's network
    /// namespace at the socket (cgroup/connect4), so a host process reaches
    /// the VIP's backends whether or not it holds the VIP.
    pub enabled: bool,
    /// The cgroup v2 directory to attach to: `auto` (the hierarchy's root,
    /// wherever it is mounted; mounted at /run/ha-lb/cgroupv2 if nowhere),
    /// or an absolute path on a cgroup2 filesystem.
    pub cgroup: CgroupSetting,
}

impl Default for SocketLbConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: CgroupSetting::Auto,
        }
    }
}

/// `socket_lb.cgroup`: the word `auto`, or a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CgroupSetting {
    /// The root of the cgroup2 hierarchy, found in /proc/self/mountinfo.
    #[default]
    Auto,
    /// A cgroup2 directory: processes in it and below it are balanced.
    Path(PathBuf),
}

impl fmt::Display for CgroupSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupSetting::Auto => f.pad("auto"),
            CgroupSetting::Path(path) => f.pad(&path.display().to_string()),
        }
    }
}

impl Serialize for CgroupSetting {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CgroupSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(if text == "auto" {
            CgroupSetting::Auto
        } else {
            CgroupSetting::Path(PathBuf::from(text))
        })
    }
}
