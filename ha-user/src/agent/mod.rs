//! `ha-user attach`: the agent.
//!
//! A few tokio tasks joined by channels, with one owner per piece of state:
//!
//! ```text
//!  probe task (one per VIP backend) ──HealthReport──┐
//!  passive reader (PASSIVE_EVENTS) ──PassiveEvent───┤
//!  VRRP announcer (adverts, timers) ──Own/Release───┤
//!  admin socket (status/drain/undrain/reload/stop) ─┼──> reconciler ──> data plane maps
//!  signals (SIGHUP reload, SIGTERM/SIGINT stop) ────┘    (this loop)     VIP addresses, neighbours
//!                                        reconciler ──Track──> announcer (priority, fault)
//!                                        reconciler ──CheckNow──> probe task (confirming check)
//! ```
//!
//! The reconciler owns the config, every backend's health, the operator's
//! drains and the data plane; on any change it recomputes the desired state
//! and lets [`DataPlane::apply`] swap in the tables that changed.
//!
//! One file per concern: [`decide`] the rules as pure functions (desired
//! state with fail open, VRRP tracking, readiness, the config diff);
//! `lifecycle` start and stop; `events` the loop and its handlers; `reload`
//! plan, apply, commit; `apply` the data-plane writes; `host` addresses,
//! neighbours and gratuitous ARP; `probes` the check tasks; `report` status
//! and readiness; `passive` passive health's events and suspects; `commands`
//! the one-shot `detach` and `check-config`.
//!
//! Start-up validates everything before touching the host, and a start that
//! fails before the program switch changes nothing. SIGTERM or SIGINT stop
//! with the `--on-stop` intent: release removes what ha-lb added, keep
//! leaves the data path serving for the next agent (docs/operations.md).

mod apply;
mod commands;
pub mod decide;
mod events;
mod host;
mod lifecycle;
mod passive;
mod probes;
mod reload;
mod report;
mod shutdown;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};

use crate::{
    blackhole,
    config::{Config, VrrpConfig},
    dataplane::{AttachMode, AttachedMode, DataPlane},
    handover::StopIntent,
    health::Health,
    netlink::{LinkHealth, Netlink},
    status::ReloadOutcome,
    system,
    vrrp::announcer,
};

pub use commands::{check_config, detach, resolve_pin_dir};
use decide::BackendKey;
pub use lifecycle::run;
use probes::{BackendHealth, HealthReport, ProbeTask};
pub use reload::ReloadError;

pub struct AttachOptions {
    pub iface: String,
    pub config_path: PathBuf,
    pub xdp_mode: AttachMode,
    /// Print counters this often (zero: never).
    pub stats_interval: Duration,
    /// Where to pin the connection tables so a restart adopts them.
    pub pin: PinLocation,
    /// What SIGTERM and SIGINT mean.
    pub on_stop: StopIntent,
    /// Replace pinned flow tables this build cannot adopt (their flows are lost).
    pub accept_flow_loss: bool,
}

pub enum PinLocation {
    /// The per-namespace default under /sys/fs/bpf (see `system::pin_dir`).
    Auto,
    Dir(PathBuf),
    Off,
}

/// How often ended flows are swept from the connection table.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How often VRRP tracking looks at the interface and the XDP attachment.
const LINK_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often the black-hole detector samples the data path's counters.
const DATA_PATH_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Time a restarted agent may still need, after deciding, to send its first
/// VRRP advertisement (it decides before loading the program).
const VRRP_RESUME_MARGIN: Duration = Duration::from_millis(500);

/// The running VRRP instance, as the reconciler sees it.
struct Vrrp {
    commands: mpsc::Sender<announcer::Command>,
    /// The announcer's latest status.
    status: watch::Receiver<announcer::VrrpStatus>,
    config: VrrpConfig,
    /// The last tracking sent to the announcer.
    tracked: decide::Tracking,
    /// From the last link check.
    link: LinkHealth,
    /// Started as master, resuming the previous agent's mastership.
    resumed: bool,
}

/// Everything the agent owns, and everything it changed on the host, so it
/// can undo exactly that.
struct Agent {
    options: AttachOptions,
    netlink: Netlink,
    ifindex: u32,
    mac: [u8; 6],
    lb_addr: IpAddr,
    /// `None` until the program is attached.
    xdp_mode: Option<AttachedMode>,
    started: Instant,
    dataplane: DataPlane,
    config: Config,
    health: BTreeMap<BackendKey, BackendHealth>,
    /// Backends an operator drained (`ha-user drain`): maintenance.
    maintenance: BTreeSet<BackendKey>,
    probes: HashMap<BackendKey, ProbeTask>,
    next_generation: u64,
    health_tx: mpsc::Sender<HealthReport>,
    /// VIPs currently failing open.
    failing_open: BTreeSet<String>,
    /// Flows reset towards their clients by reset on mark-down (challenges sent).
    sessions_reset: u64,
    /// VIP addresses this agent added (not ones that were already there).
    added_addresses: BTreeSet<IpAddr>,
    /// Managed neighbour entries this agent added.
    added_neighbours: BTreeSet<IpAddr>,
    /// Backend addresses that are this host's own (found at each config apply).
    local_backends: HashSet<IpAddr>,
    /// Whether this host answers for the VIPs now: always without VRRP,
    /// as VRRP master otherwise.
    holding: bool,
    vrrp: Option<Vrrp>,
    forwarding: system::ForwardingGuard,
    /// Whether the data path's packets are answered (docs/operations.md).
    blackhole: blackhole::Detector,
    /// What the detector counts as new flows, from the backends' totals.
    new_flow_totals: blackhole::Accumulator<(IpAddr, u16)>,
    /// The attach interface is a veth (the remedies differ).
    veth: bool,
    /// Health the last agent recorded, for the probes that start now.
    seeded: HashMap<BackendKey, Health>,
    /// The pins outlive this process (the keep intent can keep anything).
    durable_pins: bool,
    /// Reloads since the start, by outcome (`ha_lb_reloads_total`).
    reloads: BTreeMap<ReloadOutcome, u64>,
    /// The socket-level balancer as started (its counters are read at status time).
    socket_lb: crate::status::SocketLbStatus,
    /// Passive health: suspects, their resolutions, the ring's reader.
    passive: passive::PassiveHealth,
}
