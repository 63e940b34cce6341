//! The XDP program and its maps: loading, attaching, writing the desired
//! state, reading counters and sweeping the connection table.
//!
//! [`DataPlane`] is the single owner of the maps. It keeps backend ids
//! stable (a connection-table entry names its backend by id for the flow's
//! whole life), gives each VIP a slot with two Maglev table halves, and
//! switches a VIP to a new table by writing the idle half and then replacing
//! the VIP's one hash-map value, which the kernel does atomically.
//!
//! One file per concern, all of them `impl DataPlane` blocks over the one
//! type defined here (with its errors and load options):
//!
//! - `load`: loading the program, adopting what the pin directory holds,
//!   attaching (or switching the pinned link), detach and keep, the agent
//!   record;
//! - `pins`: what a pin directory holds, read without changing it, and the
//!   pin files themselves (staged `<NAME>_NEW` pins, removal);
//! - `migrate`: copying resized flow tables into the new ones;
//! - `writer`: the desired state: settings, VIPs, Maglev tables, backends;
//! - `nat_sources`: the current and earlier NAT source ranges;
//! - `passive`: passive health's SUSPECT flags and PASSIVE_EVENTS ring;
//! - `counters`: verdict, event and traffic counters;
//! - `flows`: the connection and reverse NAT tables' entries, and the
//!   address-keyed flows API;
//! - `socket_lb`: the socket-level balancer's cgroup programs, their
//!   pinned links and counters;
//! - `sweep`: the agent's sweep of those tables;
//! - `test_hooks` (feature `test-hooks`): what only the tests, benchmarks
//!   and fuzzer use.

mod counters;
mod egress;
mod flows;
mod load;
mod migrate;
mod nat_sources;
mod passive;
mod pins;
mod socket_lb;
mod sweep;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod writer;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
};

use aya::{Ebpf, maps::MapError, programs::ProgramError};
use ha_common::{NatRange, Settings, TX_PORTS_MAP, VipKey, XDP_PROGRAM_NAME};

pub use self::{
    counters::TrafficSnapshot,
    flows::{FlowCount, FlowView},
    nat_sources::{describe_range, nat_sources_of, next_nat_ranges, ranges_in_use},
    passive::{PassiveEvents, parse_passive_event},
    pins::{LinkFound, PinnedState, inspect_pins, remove_pins},
    sweep::{
        PlannedSweep, SweepPlan, SweepReport, SweepTotals, flow_still_expired, plan_sweep,
        reverse_still_removable,
    },
    writer::{DesiredBackend, DesiredVip},
};
use self::{
    load::{Attachment, PendingLink},
    migrate::OldTable,
    pins::RecordMap,
    writer::VipSlot,
};
use crate::handover::{Record, StartKind, WouldDropFlows};

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(
        "this ha-user was built without the XDP object; run `cargo xtask build-ebpf --release` \
         and rebuild"
    )]
    NoXdpObject,
    #[error("loading the embedded eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program named {XDP_PROGRAM_NAME}")]
    MissingProgram,
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("the kernel rejected the XDP program: {0}")]
    Verify(#[source] ProgramError),
    #[error(
        "the eBPF object has no program named {}",
        ha_common::TC_EGRESS_PROGRAM_NAME
    )]
    MissingEgressProgram,
    #[error("the kernel rejected the tc egress program: {0}")]
    EgressVerify(#[source] ProgramError),
    #[error("attaching the tc egress program to {iface}: {reason}")]
    EgressAttach { iface: String, reason: String },
    #[error(
        "generic (skb) XDP is not supported (interface {iface}): in generic mode the program is \
         handed GRO-merged packets of up to 64 KiB and checksums the kernel has not completed, \
         which a NAT cannot rewrite correctly. Use an interface whose driver runs XDP natively \
         (most NIC drivers, virtio_net, ena, vmxnet3 on kernel 6.6+, veth, bonding)"
    )]
    GenericRefused { iface: String },
    #[error(
        "attaching XDP to interface {iface} in {mode} mode: {source} (ha-lb needs native XDP: \
         check that the driver supports it, `ethtool -i {iface}`; generic mode is not a fallback)"
    )]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    /// An IPv6 address reached the maps, which are IPv4 (validation refuses it first).
    #[error("{what}: {source}")]
    NotIpv4 {
        what: String,
        #[source]
        source: crate::ip::NotIpv4,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("walking map {map}: {source}")]
    Dump {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("adding interface index {ifindex} to {TX_PORTS_MAP}: {source}")]
    TxPort {
        ifindex: u32,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    WouldDropFlows(#[from] WouldDropFlows),
    #[error(
        "interface {iface} already has an XDP program attached that this agent does not own: an \
         earlier ha-lb agent's pinned link in another pin directory (its --pin-dir), or another \
         tool's. `ha-user detach --iface {iface} [--pin-dir DIR]` removes ha-lb's; `ip link show \
         {iface}` names the program"
    )]
    AlreadyAttached { iface: String },
    #[error("pinned link {path}: {reason}")]
    PinnedLink { path: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: String, reason: String },
    #[cfg(feature = "test-hooks")]
    #[error("reading the XDP object {path} (HA_LB_XDP_OBJECT): {source}")]
    Object {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the socket-level balancer's program {program}: {source}")]
    SocketLbProgram {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{wanted} VIPs but the data plane was loaded with room for {max_vips}")]
    TooManyVips { wanted: usize, max_vips: u32 },
    #[error("more than {} backends", ha_common::MAX_BACKENDS)]
    TooManyBackends,
    #[error(
        "the NAT source would change to {next} while {} earlier sources still have flows ({}); \
         wait for those flows to end (each range is dropped by the sweep once no flow uses it) or restart the agent",
        .live.len(),
        .live.join(", ")
    )]
    TooManyNatRanges { next: String, live: Vec<String> },
}

type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

/// How attach should pick the XDP mode. Only native (driver) mode is
/// supported: `Auto` and `Native` attach in it or fail with an error that
/// says so; `Generic` is refused with the reason (docs/design.md, "Generic
/// mode, jumbo frames"). Never a silent fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

/// The mode the XDP program is attached in (status, `/metrics`); the serde
/// spelling is the label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.label())
    }
}

impl AttachedMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
        }
    }
}

/// Map sizes fixed at load time, and where to pin the tables that outlive the agent.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub maglev_table_size: u32,
    pub max_vips: u32,
    /// Entries of the connection table.
    pub max_flows: u32,
    /// Pin (and adopt) the connection, reverse NAT and backend tables here.
    pub pin_dir: Option<PathBuf>,
    /// The host's own ephemeral ports (`net.ipv4.ip_local_port_range`), as
    /// `(min, max)`: a NAT source adopted from pinned flows never spans them.
    pub host_ports: Option<(u16, u16)>,
    /// Replace pinned flow tables this build cannot adopt even when they hold
    /// flows (those connections are lost); without it, loading refuses.
    pub accept_flow_loss: bool,
}

impl LoadOptions {
    /// Slots of each CPU's queue of recently created flows, where a full
    /// table makes room: together the CPUs' queues cover the whole table.
    pub fn embryonic_slots(&self) -> u32 {
        self.max_flows.div_ceil(possible_cpus()).max(1)
    }

    /// Entries of the connection table.
    pub fn table_entries(&self) -> u32 {
        self.max_flows
    }

    /// Entries of the reverse NAT table: one per NATed flow, and a margin,
    /// so that a full connection table (where room is made) fills first.
    pub fn reverse_entries(&self) -> u32 {
        self.max_flows
            .saturating_add((self.max_flows / 16).max(1024))
    }
}

/// CPUs the kernel may run the program on (per-CPU maps have a slot for each).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1).max(1)
}

/// The loaded program and its maps. Dropping it leaves a pinned attachment
/// in place and removes an unpinned one.
pub struct DataPlane {
    ebpf: Ebpf,
    attachment: Option<Attachment>,
    pending_link: Option<PendingLink>,
    pin_dir: Option<PathBuf>,
    record_map: Option<RecordMap>,
    /// What the record map holds.
    record: Record,
    /// The previous agent's record, as found at load.
    found_record: Option<Record>,
    tag: u64,
    program_id: u32,
    found_link: bool,
    /// Resized flow tables being migrated: the old maps, copied from until
    /// the program switch is done.
    migrating: Vec<OldTable>,
    /// Tables pinned as `<NAME>_NEW` until the switch (see `staged`).
    staged_pins: Vec<String>,
    start: StartKind,
    replaced_tag: Option<u64>,
    table_size: u32,
    max_vips: u32,
    vips: HashMap<VipKey, VipSlot>,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    /// Ids of backends no VIP uses any more; kept until no flow names them.
    retired: HashSet<u32>,
    /// What SETTINGS holds (with the earlier NAT ranges and the queue size filled in).
    settings: Settings,
    /// Earlier NAT sources whose flows may still live (`settings.nat[1..]`).
    earlier_nat: Vec<NatRange>,
    embryonic_slots: u32,
    sweep_totals: SweepTotals,
    /// The live slot of SETTINGS (0 or 1; the other is written next).
    settings_slot: u32,
    /// The socket-level balancer's links, once attached.
    socket_lb: Option<socket_lb::SocketLbAttachment>,
    /// The tc egress program's attachment (local backends' replies).
    egress: egress::Egress,
}

impl DataPlane {
    fn map<'a, T>(&'a self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DataPlaneError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataPlaneError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    /// Every (key, value) of hash map `name` (`BPF_MAP_LOOKUP_BATCH`).
    fn dump<K: Copy, V: Copy>(&self, name: &'static str) -> Result<Vec<(K, V)>> {
        let pairs = crate::batch::dump(
            self.map_fd(name)?,
            std::mem::size_of::<K>(),
            std::mem::size_of::<V>(),
            usize::MAX,
        )
        .map_err(|source| DataPlaneError::Dump { map: name, source })?;
        Ok(pairs
            .iter()
            .map(|(k, v)| (crate::batch::read::<K>(k), crate::batch::read::<V>(v)))
            .collect())
    }

    /// The file descriptor of map `name` (the fuzzer dumps whole maps with
    /// one batch syscall each).
    ///
    /// # Errors
    /// [`DataPlaneError::MissingMap`] if the object has no such map.
    pub fn map_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>> {
        use aya::maps::Map;
        use std::os::fd::AsFd;
        match self.ebpf.map(name) {
            Some(
                Map::Array(data)
                | Map::HashMap(data)
                | Map::LruHashMap(data)
                | Map::PerCpuArray(data)
                | Map::PerCpuHashMap(data)
                | Map::DevMapHash(data),
            ) => Ok(data.fd().as_fd()),
            _ => Err(DataPlaneError::MissingMap(name)),
        }
    }
}

/// How many times [`load_program`] tries, as libbpf's `PROG_LOAD_ATTEMPTS`.
const PROG_LOAD_ATTEMPTS: u32 = 5;

/// Loads `program` into the kernel (BPF_PROG_LOAD), trying again when the
/// kernel answers EAGAIN: the verifier gives up with EAGAIN when a signal
/// arrives while it works (kernel/bpf/verifier.c, `do_check`), and
/// verifying the data path takes tens of milliseconds, enough for a SIGHUP
/// to the starting agent, or a SIGCHLD in a test harness, to land in it.
/// libbpf retries the same way.
///
/// # Errors
/// The last attempt's [`ProgramError`] (the verifier's log with it).
pub fn load_program(program: &mut aya::programs::Xdp) -> Result<(), ProgramError> {
    load_retrying(|| program.load())
}

/// `load` (one BPF_PROG_LOAD) tried again on EAGAIN, as [`load_program`].
pub(crate) fn load_retrying(
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        let result = load();
        match &result {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN)
                    && attempt < PROG_LOAD_ATTEMPTS =>
            {
                tracing::debug!(attempt, "BPF_PROG_LOAD interrupted (EAGAIN): trying again");
                attempt += 1;
            }
            _ => return result,
        }
    }
}

/// The clock the data path stamps flows with (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
