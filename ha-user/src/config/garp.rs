//! `garp`: the gratuitous ARPs sent when the VIPs are taken, with or without VRRP.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GarpConfig {
    /// Announcements sent on taking the VIPs (keepalived's garp_master_repeat).
    pub count: u32,
    /// Between them (keepalived's garp_interval).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// While master, announce again this often; 0s: never (keepalived's garp_master_refresh).
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
}

impl Default for GarpConfig {
    fn default() -> Self {
        Self {
            count: 5,
            interval: Duration::ZERO,
            refresh: Duration::ZERO,
        }
    }
}
