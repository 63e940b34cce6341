//! The XDP program and its maps: loading, attaching, writing the desired
//! state, reading counters and sweeping the connection table.
//!
//! [`DataPlane`] is the single owner of the maps. It keeps backend ids
//! stable (a connection-table entry names its backend by id for the flow's
//! whole life), gives each VIP a slot with two Maglev table halves, and
//! switches a VIP to a new table by writing the idle half and then replacing
//! the VIP's one hash-map value, which the kernel does atomically.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, DevMapHash, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use ha_common::{
    BACKEND_FLAG_DOWN, BACKEND_FLAG_LOCAL, BACKEND_INDEX_MAP, BACKEND_STATS_MAP, BACKENDS_MAP,
    BackendAddr, BackendInfo, CONNTRACK_MAP, Counter, EMBRYONIC_HEAD_MAP, EMBRYONIC_MAP,
    EVENTS_MAP, Event, Flow, FlowKey, MAGLEV_MAP, NAT_RANGES, NatEntry, NatKey, NatRange,
    ORPHAN_GRACE_NS, REVERSE_NAT_MAP, SETTINGS_ACTIVE_MAP, SETTINGS_MAP, Settings, TX_PORTS_MAP,
    TrafficCounter, VERDICTS_MAP, VIP_FLAG_ENABLED, VIP_STATS_MAP, VIPS_MAP, Verdict, VipInfo,
    VipKey, XDP_PROGRAM_NAME, addr_from_wire, addr_to_wire, port_to_wire,
};
use tracing::{debug, info, warn};

use crate::{
    ebpf_object,
    handover::{
        self, LINK_PIN, RECORD_ENTRIES, RECORD_PIN, Record, RecordKey, RecordValue, StartKind,
        TablesFound, TablesPlan, WouldDropFlows,
    },
    maglev::{MaglevBackend, build_table},
};

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("loading the embedded eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no program named {XDP_PROGRAM_NAME}")]
    MissingProgram,
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("the kernel rejected the XDP program: {0}")]
    Verify(#[source] ProgramError),
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
    #[error(
        "this ha-user was built without the XDP object; run `cargo xtask build-ebpf --release` \
         and rebuild"
    )]
    NoXdpObject,
    #[error("reading the XDP object {path} (HA_LB_XDP_OBJECT): {source}")]
    Object {
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
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

/// Maps pinned so a restarted agent finds its flows: their entries name
/// backends by id, so the backend table goes with them.
const PINNED_MAPS: [&str; 3] = [CONNTRACK_MAP, REVERSE_NAT_MAP, BACKENDS_MAP];

/// A VIP as the data plane should serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: u8,
    /// Whether this host answers for the VIP now (VRRP master, or static).
    pub enabled: bool,
    pub backends: Vec<DesiredBackend>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
    /// The backend is an address of this host: deliver locally, no NAT.
    pub local: bool,
    /// The backend does not answer: move its established flows (draining is weight 0 alone).
    pub down: bool,
}

impl DesiredVip {
    fn key(&self) -> VipKey {
        VipKey {
            addr: addr_to_wire(self.address.octets()),
            port: port_to_wire(self.port),
            protocol: self.protocol,
            _pad: 0,
        }
    }
}

/// What the writer knows about a VIP it has written.
struct VipSlot {
    name: String,
    slot: u32,
    /// 0 or 1: which half of the slot's region is live.
    active_half: u32,
    table: Vec<u32>,
    flags: u32,
}

/// Per-VIP and per-backend totals, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct TrafficSnapshot {
    pub vips: Vec<(String, TrafficCounter)>,
    pub backends: Vec<((Ipv4Addr, u16), TrafficCounter)>,
}

/// What one sweep of the connection and reverse NAT tables found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows left in the table.
    pub live: usize,
    /// Ended flows removed with their reverse entries.
    pub expired: usize,
    /// Live NATed flows whose missing reverse entry was put back.
    pub reverse_recovered: usize,
    /// Reverse entries whose flow was gone, removed (their NAT port is free again).
    pub orphans_freed: usize,
}

/// Running totals of what the sweeps did since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepTotals {
    pub sweeps: u64,
    /// Flows in the table after the last sweep.
    pub live: u64,
    pub expired: u64,
    pub reverse_recovered: u64,
    pub orphans_freed: u64,
}

impl SweepTotals {
    fn add(&mut self, report: &SweepReport) {
        self.sweeps += 1;
        self.live = report.live as u64;
        self.expired += report.expired as u64;
        self.reverse_recovered += report.reverse_recovered as u64;
        self.orphans_freed += report.orphans_freed as u64;
    }
}

/// What a sweep will change, decided from snapshots of both tables.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepPlan {
    /// Ended flows to remove (their reverse entries are in `remove_reverse`).
    pub remove_flows: Vec<FlowKey>,
    /// Reverse entries of ended flows to remove, as the snapshot had them.
    pub remove_reverse: Vec<(NatKey, NatEntry)>,
    /// Orphans to remove (reverse entries no live flow names, past the
    /// grace), as the snapshot had them.
    pub orphans: Vec<(NatKey, NatEntry)>,
    /// Reverse entries to put back for live flows that lost theirs.
    pub recover_reverse: Vec<(NatKey, NatEntry)>,
    /// Backend ids that live flows name.
    pub referenced: HashSet<u32>,
}

/// A sweep decided and not yet applied ([`DataPlane::plan_sweep`]).
#[derive(Debug)]
pub struct PlannedSweep {
    settings: Settings,
    now_ns: u64,
    flows: Vec<(FlowKey, Flow)>,
    entries: Vec<(NatKey, NatEntry)>,
    pub plan: SweepPlan,
}

/// Decides a sweep (docs/data-path.md, "The agent's sweep") from snapshots
/// of the connection table (taken first), the reverse table and the backend
/// records the flows name. Pure: the same rules as the data path, from
/// `ha_common`.
pub fn plan_sweep(
    settings: &Settings,
    flows: &[(FlowKey, Flow)],
    entries: &[(NatKey, NatEntry)],
    backends: &HashMap<u32, BackendInfo>,
    now_ns: u64,
) -> SweepPlan {
    let reverse: HashMap<&NatKey, &NatEntry> = entries.iter().map(|(k, e)| (k, e)).collect();
    let nat_key_of = |key: &FlowKey, flow: &Flow| {
        if flow.flags & ha_common::FLOW_LOCAL != 0 {
            return None;
        }
        let backend = backends.get(&flow.backend_id)?;
        Some(NatKey::new(
            backend,
            flow.nat_addr,
            flow.nat_port,
            key.protocol,
        ))
    };
    let mut plan = SweepPlan::default();
    let mut live: HashMap<&FlowKey, &Flow> = HashMap::new();
    // How many live flows name each NAT key: a lost reverse entry is put back
    // only for a key that one flow alone names, so the order flows come in
    // never decides which of two gets it.
    let mut named: HashMap<NatKey, usize> = HashMap::new();
    for (key, flow) in flows {
        if !flow.is_expired(key.protocol, settings, now_ns)
            && let Some(nat_key) = nat_key_of(key, flow)
        {
            *named.entry(nat_key).or_default() += 1;
        }
    }
    for (key, flow) in flows {
        let nat_key = nat_key_of(key, flow);
        if flow.is_expired(key.protocol, settings, now_ns) {
            plan.remove_flows.push(*key);
            if let Some(nat_key) = nat_key
                && let Some(entry) = reverse.get(&nat_key).filter(|e| e.flow == *key)
            {
                plan.remove_reverse.push((nat_key, **entry));
            }
            continue;
        }
        live.insert(key, flow);
        plan.referenced.insert(flow.backend_id);
        if let Some(nat_key) = nat_key
            && !reverse.contains_key(&nat_key)
            && named.get(&nat_key) == Some(&1)
        {
            let entry = NatEntry {
                flow: *key,
                backend_id: flow.backend_id,
                _pad: 0,
                created_ns: now_ns,
            };
            plan.recover_reverse.push((nat_key, entry));
        }
    }
    let removed: HashSet<NatKey> = plan.remove_reverse.iter().map(|(k, _)| *k).collect();
    for (nat_key, entry) in entries {
        if removed.contains(nat_key) {
            continue;
        }
        let owned = live
            .get(&entry.flow)
            .is_some_and(|f| f.names(nat_key.lb_addr, nat_key.nat_port, entry.backend_id));
        if !owned && now_ns > entry.created_ns.saturating_add(ORPHAN_GRACE_NS) {
            plan.orphans.push((*nat_key, *entry));
        }
    }
    plan
}

/// Whether a flow the sweep planned to remove may still go: the table holds
/// it still (`current`), still expired at `now_ns`. The snapshot is a walk of
/// the whole table; meanwhile a packet may have refreshed the flow, or a SYN
/// made a new one under the same key.
pub fn flow_still_expired(
    key: &FlowKey,
    current: Option<&Flow>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    current.is_some_and(|flow| flow.is_expired(key.protocol, settings, now_ns))
}

/// Whether a reverse entry the sweep planned to remove may still go: the
/// table holds the very entry the snapshot had (`current`; not a new flow's
/// claim of the same port), and its flow (`owner`, looked up now) does not
/// name it while live.
pub fn reverse_still_removable(
    nat_key: &NatKey,
    planned: &NatEntry,
    current: Option<&NatEntry>,
    owner: Option<&Flow>,
    settings: &Settings,
    now_ns: u64,
) -> bool {
    current == Some(planned)
        && !owner.is_some_and(|flow| {
            flow.names(nat_key.lb_addr, nat_key.nat_port, planned.backend_id)
                && !flow.is_expired(planned.flow.protocol, settings, now_ns)
        })
}

/// The NAT sources after the current one becomes `next`: the previous
/// current one moves to the earlier ranges (replies to its flows stay
/// translated until the sweep finds none left), and `next` leaves them if it
/// was there. At most [`NAT_RANGES`] - 1 earlier ranges.
///
/// # Errors
/// [`DataPlaneError::TooManyNatRanges`] when one more would be needed.
pub fn next_nat_ranges(
    current: Option<NatRange>,
    earlier: &[NatRange],
    next: NatRange,
) -> Result<Vec<NatRange>, DataPlaneError> {
    // A range the next one covers needs no slot of its own: its flows' replies are in `next`.
    let covered = |r: &NatRange| {
        r.addr == next.addr && r.port_min >= next.port_min && r.port_max <= next.port_max
    };
    let mut ranges: Vec<NatRange> = earlier.iter().copied().filter(|r| !covered(r)).collect();
    if let Some(current) = current
        && !covered(&current)
        && current.addr != 0
        && !ranges.contains(&current)
    {
        ranges.insert(0, current);
    }
    if ranges.len() > NAT_RANGES - 1 {
        return Err(DataPlaneError::TooManyNatRanges {
            next: describe_range(&next),
            live: earlier.iter().map(describe_range).collect(),
        });
    }
    Ok(ranges)
}

/// The NAT sources a set of reverse entries uses: per NAT address, the
/// range from its lowest to its highest port, split around `host_ports`
/// (`(min, max)`, the host's own ephemeral ports, which a NAT source must
/// never cover: their replies would be taken for NAT replies; ports inside
/// them, only possible if the host's range changed, are left out); the
/// [`NAT_RANGES`] - 1 sources with the most entries, most used first.
pub fn nat_sources_of(keys: &[NatKey], host_ports: Option<(u16, u16)>) -> Vec<NatRange> {
    // (address, side of the host's ports: 0 below, 1 inside, 2 above)
    let mut by_addr: BTreeMap<(u32, u8), (usize, u16, u16)> = BTreeMap::new();
    for key in keys {
        let port = ha_common::port_from_wire(key.nat_port);
        let side = match host_ports {
            Some((min, _)) if port < min => 0,
            Some((_, max)) if port > max => 2,
            Some(_) => 1,
            None => 0,
        };
        let entry = by_addr
            .entry((key.lb_addr, side))
            .or_insert((0, port, port));
        entry.0 += 1;
        entry.1 = entry.1.min(port);
        entry.2 = entry.2.max(port);
    }
    let mut sources: Vec<(usize, NatRange)> = by_addr
        .into_iter()
        .filter(|((addr, side), (count, _, _))| {
            if *side == 1 {
                warn!(
                    flows = count,
                    "adopted flows use NAT ports inside net.ipv4.ip_local_port_range; they are not kept as a NAT source"
                );
            }
            *addr != 0 && *side != 1
        })
        .map(|((addr, _), (count, port_min, port_max))| {
            (
                count,
                NatRange {
                    addr,
                    port_min,
                    port_max,
                },
            )
        })
        .collect();
    sources.sort_by_key(|s| std::cmp::Reverse(s.0));
    if sources.len() > NAT_RANGES - 1 {
        warn!(
            sources = sources.len(),
            "adopted flows use more NAT addresses than can stay live; those of the least used are lost"
        );
    }
    sources
        .into_iter()
        .take(NAT_RANGES - 1)
        .map(|(_, range)| range)
        .collect()
}

/// `address:min-max` of a NAT range.
pub fn describe_range(range: &NatRange) -> String {
    format!(
        "{}:{}-{}",
        Ipv4Addr::from(addr_from_wire(range.addr)),
        range.port_min,
        range.port_max
    )
}

/// Which of the `earlier` ranges the NAT sources in use keep alive (each
/// `(address, port)` in wire order, of a reverse entry or a flow): those
/// holding one, unless the current range holds it too.
pub fn ranges_in_use(
    current: &NatRange,
    earlier: &[NatRange],
    in_use: impl IntoIterator<Item = (u32, u16)>,
) -> Vec<bool> {
    let mut used = vec![false; earlier.len()];
    for (addr, port) in in_use {
        if current.contains(addr, port) {
            continue;
        }
        for (i, range) in earlier.iter().enumerate() {
            if range.contains(addr, port) {
                used[i] = true;
            }
        }
    }
    used
}

/// A flow table being migrated to a new size, held open by this agent.
enum OldTable {
    Flows(BpfHashMap<MapData, FlowKey, Flow>),
    Reverse(BpfHashMap<MapData, NatKey, NatEntry>),
}

impl OldTable {
    fn open(name: &str, path: &Path) -> Result<Self> {
        let pin_error = |reason: String| DataPlaneError::Pin {
            path: path.display().to_string(),
            reason,
        };
        let data = MapData::from_pin(path).map_err(|e| pin_error(e.to_string()))?;
        let map = aya::maps::Map::HashMap(data);
        match name {
            CONNTRACK_MAP => Ok(OldTable::Flows(
                BpfHashMap::try_from(map).map_err(|e| pin_error(e.to_string()))?,
            )),
            REVERSE_NAT_MAP => Ok(OldTable::Reverse(
                BpfHashMap::try_from(map).map_err(|e| pin_error(e.to_string()))?,
            )),
            _ => Err(pin_error("this table cannot be resized".to_string())),
        }
    }
}

/// The program's XDP attachment: a bpf_link, pinned (it then outlives the
/// agent) unless pinning is off.
struct Attachment {
    link: FdLink,
    pin: Option<PathBuf>,
    iface: String,
}

/// A pinned link found at load, replaced by [`DataPlane::attach`].
struct PendingLink {
    link: FdLink,
    path: PathBuf,
    found: LinkFound,
}

/// The program a pinned link runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFound {
    pub program_id: u32,
    pub program_name: String,
    pub program_tag: u64,
}

/// What a pin directory holds, read without changing anything.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    pub link: Option<LinkFound>,
    /// `None` when no flow table is pinned.
    pub tables: Option<TablesFound>,
    pub record: Option<Record>,
}

impl PinnedState {
    /// One paragraph for `check-config` and the agent's log: what is pinned
    /// and what an agent with `options` will do with it.
    pub fn describe(&self, dir: &Path, accept_flow_loss: bool) -> String {
        let mut lines = vec![format!("pinned state in {}:", dir.display())];
        match &self.link {
            Some(link) => lines.push(format!(
                "  program {} (tag {}, id {}) attached through the pinned link: the new agent \
                 replaces it in place (bpf_link_update), no packet meets an empty interface",
                link.program_name,
                handover::tag_hex(link.program_tag),
                link.program_id
            )),
            None => lines.push("  no pinned link: the program is attached anew".to_string()),
        }
        lines.push(
            match handover::plan_tables(self.tables.as_ref(), accept_flow_loss) {
                Ok(TablesPlan::Fresh) => "  no pinned flow tables: they start empty".to_string(),
                Ok(TablesPlan::Adopt { flows }) => format!(
                    "  flow tables (layout version {}) adopted with their {flows} flows",
                    handover::LAYOUT_VERSION
                ),
                Ok(TablesPlan::Migrate { flows, resized }) => format!(
                    "  flow tables resized ({}): their {flows} flows are copied into the new ones",
                    describe_resized(&resized)
                ),
                Ok(TablesPlan::Replace { flows, reason }) => format!(
                    "  flow tables REPLACED by empty ones ({reason}): {flows} flows are lost"
                ),
                Err(refusal) => format!("  REFUSED: {refusal}"),
            },
        );
        if let Some(record) = &self.record {
            lines.push(format!(
                "  agent record: {} VIP addresses added by ha-lb, {} backends' health and drains{}",
                record.addresses.len(),
                record.backends.len(),
                match record.vrrp {
                    Some(v) if v.master => ", last VRRP state master",
                    Some(_) => ", last VRRP state backup",
                    None => "",
                }
            ));
        }
        lines.join("\n")
    }
}

/// Reads what `dir` holds: the link and the program it runs, the flow
/// tables (do they fit `options`, how many flows), the agent record.
///
/// # Errors
/// [`DataPlaneError::PinnedLink`] when the pinned link cannot be read or runs
/// a program that is not ha-lb's.
pub fn inspect_pins(dir: &Path, options: &LoadOptions) -> Result<PinnedState> {
    inspect_and_open(dir, options).map(|(state, _)| state)
}

/// [`inspect_pins`], and the pinned link itself, opened once.
fn inspect_and_open(dir: &Path, options: &LoadOptions) -> Result<(PinnedState, Option<FdLink>)> {
    let pinned: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, dir.join(name)))
        .filter(|(_, path)| path.exists())
        .collect();
    let record_path = dir.join(RECORD_PIN);
    let record = if record_path.exists() {
        match open_record(&record_path) {
            Ok(map) => Some(read_record(&map)?),
            Err(e) => {
                warn!(pin = %record_path.display(), error = %e, "unreadable agent record; ignored");
                None
            }
        }
    } else {
        None
    };
    let link_path = dir.join(LINK_PIN);
    let (fd_link, link) = if link_path.exists() {
        let (fd_link, found) = open_pinned_link(&link_path, record.as_ref())?;
        (Some(fd_link), Some(found))
    } else {
        (None, None)
    };
    let tables = (!pinned.is_empty()).then(|| {
        let mut misfits: Vec<String> = PINNED_MAPS
            .iter()
            .filter(|name| !pinned.iter().any(|(n, _)| n == *name))
            .map(|name| format!("{name} is missing"))
            .collect();
        let mut resized = Vec::new();
        for (name, path) in &pinned {
            match pin_misfit(name, path, &pinned_layout(name, options)) {
                None => {}
                Some(Misfit::Entries { pinned, wanted }) => {
                    resized.push((name.to_string(), pinned, wanted))
                }
                Some(Misfit::Structure(why)) => misfits.push(why),
            }
        }
        let flows = pinned
            .iter()
            .find(|(name, _)| *name == CONNTRACK_MAP)
            .map_or(0, |(_, path)| count_entries(path));
        TablesFound {
            layout: record.as_ref().and_then(|r| r.layout),
            flows,
            misfits,
            resized,
        }
    });
    let state = PinnedState {
        link,
        tables,
        record,
    };
    Ok((state, fd_link))
}

/// Opens the pinned link and says which program it runs: the one the agent
/// record names when the ids match, else one looked up by id (which needs
/// CAP_SYS_ADMIN); a program that is not ha-lb's is refused.
fn open_pinned_link(path: &Path, record: Option<&Record>) -> Result<(FdLink, LinkFound)> {
    let error = |reason: String| DataPlaneError::PinnedLink {
        path: path.display().to_string(),
        reason,
    };
    let link: FdLink = PinnedLink::from_pin(path)
        .map_err(|e| error(e.to_string()))?
        .into();
    let info = link.info().map_err(|e| error(e.to_string()))?;
    if info.link_type().ok() != Some(aya::programs::links::LinkType::Xdp) {
        return Err(error("not an XDP link".to_string()));
    }
    let program_id = info.program_id();
    if let Some(program) = record.and_then(|r| r.program)
        && program.id == program_id
    {
        return Ok((
            link,
            LinkFound {
                program_id,
                program_name: XDP_PROGRAM_NAME.to_string(),
                program_tag: program.tag,
            },
        ));
    }
    let program = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == program_id)
        .ok_or_else(|| {
            error(format!(
                "it runs program id {program_id}, which the agent record does not name and \
                 which cannot be looked up (that needs CAP_SYS_ADMIN): not touching it; \
                 `ha-user detach` removes it"
            ))
        })?;
    let program_name = program.name_as_str().unwrap_or("").to_string();
    if program_name != XDP_PROGRAM_NAME {
        return Err(error(format!(
            "it runs program {program_name:?} (id {program_id}), not ha-lb's {XDP_PROGRAM_NAME}: \
             not touching it"
        )));
    }
    Ok((
        link,
        LinkFound {
            program_id,
            program_name,
            program_tag: program.tag(),
        },
    ))
}

type RecordMap = BpfHashMap<MapData, RecordKey, RecordValue>;

fn open_record(path: &Path) -> Result<RecordMap, MapError> {
    let data = MapData::from_pin(path)?;
    RecordMap::try_from(aya::maps::Map::HashMap(data))
}

fn read_record(map: &RecordMap) -> Result<Record> {
    let entries: Vec<(RecordKey, RecordValue)> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(map_error(RECORD_PIN))?;
    Ok(Record::from_entries(entries))
}

/// Entries of a pinned hash map, whatever its key size (BPF_MAP_GET_NEXT_KEY).
fn count_entries(path: &Path) -> usize {
    use std::os::fd::{AsFd, AsRawFd};
    let Ok(map) = MapData::from_pin(path) else {
        return 0;
    };
    let Ok(info) = map.info() else {
        return 0;
    };
    #[repr(C)]
    struct NextKey {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    let size = info.key_size() as usize;
    let (mut key, mut next) = (vec![0u8; size], vec![0u8; size]);
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut count = 0;
    let mut first = true;
    loop {
        let attr = NextKey {
            map_fd: fd,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        // SAFETY: bpf(2) with a valid attr whose pointers outlive the call
        // and point at buffers of the map's key size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const NextKey,
                std::mem::size_of::<NextKey>(),
            )
        };
        if rc != 0 {
            return count;
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}

/// The object to load: the embedded one, or for tests of upgrades
/// (docs/development.md) the file `HA_LB_XDP_OBJECT` names.
fn xdp_object() -> Result<std::borrow::Cow<'static, [u8]>> {
    match std::env::var_os("HA_LB_XDP_OBJECT") {
        Some(path) => {
            let bytes = std::fs::read(&path).map_err(|source| DataPlaneError::Object {
                path: PathBuf::from(&path).display().to_string(),
                source,
            })?;
            warn!(object = %PathBuf::from(path).display(), "loading the XDP object HA_LB_XDP_OBJECT names, not the embedded one");
            Ok(std::borrow::Cow::Owned(bytes))
        }
        None => ebpf_object::embedded()
            .map(std::borrow::Cow::Borrowed)
            .ok_or(DataPlaneError::NoXdpObject),
    }
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
}

impl DataPlane {
    /// Loads the XDP program (verifier included), adopting what the pin
    /// directory holds: the flow tables where they fit, the agent record, and
    /// the pinned link, which [`DataPlane::attach`] then points at this
    /// program. Nothing in the directory changes before every check passed.
    ///
    /// # Errors
    /// [`DataPlaneError::WouldDropFlows`] when pinned flows cannot be adopted
    /// and `options.accept_flow_loss` is off; [`DataPlaneError::PinnedLink`]
    /// when the pinned link is not ha-lb's; loading or verifying failures.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        raise_memlock_limit();
        let maglev_entries = options.maglev_table_size * 2 * options.max_vips;
        let embryonic_slots = options.embryonic_slots();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAGLEV_MAP, maglev_entries)
            .map_max_entries(CONNTRACK_MAP, options.table_entries())
            .map_max_entries(REVERSE_NAT_MAP, options.reverse_entries())
            .map_max_entries(EMBRYONIC_MAP, embryonic_slots);
        let mut pending_link = None;
        let mut found_record = None;
        let mut migrating = Vec::new();
        let mut staged_pins = Vec::new();
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir).map_err(|source| DataPlaneError::PinDir {
                path: dir.display().to_string(),
                source,
            })?;
            // New tables of a start that failed before its switch.
            for name in PINNED_MAPS {
                let _ = remove_if_present(&staged(dir, name));
            }
            let (pinned, fd_link) = inspect_and_open(dir, options)?;
            let plan = handover::plan_tables(pinned.tables.as_ref(), options.accept_flow_loss)?;
            if let (Some(link), Some(found)) = (fd_link, pinned.link.clone()) {
                pending_link = Some(PendingLink {
                    link,
                    path: dir.join(LINK_PIN),
                    found,
                });
            }
            match &plan {
                TablesPlan::Fresh => {}
                TablesPlan::Migrate { flows, resized } => {
                    info!(dir = %dir.display(), flows, resized = %describe_resized(resized), "migrating the pinned flow tables to new sizes");
                    for (name, _, _) in resized {
                        migrating.push(OldTable::open(name, &dir.join(name))?);
                        staged_pins.push(name.clone());
                    }
                }
                TablesPlan::Adopt { flows } => {
                    info!(dir = %dir.display(), flows, "adopting the pinned flow tables")
                }
                TablesPlan::Replace { flows, reason } => {
                    warn!(dir = %dir.display(), flows, %reason, "replacing the pinned flow tables with empty ones; their flows are lost");
                    staged_pins.extend(PINNED_MAPS.iter().map(|name| name.to_string()));
                }
            }
            found_record = pinned.record;
            // New tables are pinned beside the old ones and take their names
            // only once the program switch is done (`commit_staged_pins`):
            // a start that fails before leaves the old ones as they were.
            for name in PINNED_MAPS {
                let path = if staged_pins.iter().any(|s| s == name) {
                    staged(dir, name)
                } else {
                    dir.join(name)
                };
                loader.map_pin_path(name, path);
            }
        }
        let object = xdp_object()?;
        let mut ebpf = loader.load(&object)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram)?
            .try_into()
            .map_err(DataPlaneError::Verify)?;
        program.load().map_err(DataPlaneError::Verify)?;
        let info = program.info().map_err(DataPlaneError::Verify)?;
        let (tag, program_id) = (info.tag(), info.id());
        let record_map = match &options.pin_dir {
            Some(dir) => Some(record_map(&dir.join(RECORD_PIN))?),
            None => None,
        };
        let found_link = pending_link.is_some();
        let mut dataplane = Self {
            ebpf,
            attachment: None,
            pending_link,
            pin_dir: options.pin_dir.clone(),
            record_map,
            record: Record::default(),
            found_record: found_record.clone(),
            tag,
            program_id,
            found_link,
            migrating,
            staged_pins,
            start: StartKind::Fresh,
            replaced_tag: None,
            table_size: options.maglev_table_size,
            max_vips: options.max_vips,
            vips: HashMap::new(),
            backend_ids: BTreeMap::new(),
            retired: HashSet::new(),
            settings: Settings::default(),
            earlier_nat: Vec::new(),
            embryonic_slots,
            sweep_totals: SweepTotals::default(),
            settings_slot: 0,
        };
        if dataplane.record_map.is_some() {
            dataplane.record = found_record.unwrap_or_default();
            let mut record = dataplane.record.clone();
            record.layout = Some(handover::LAYOUT_VERSION);
            dataplane.store_record(&record)?;
        }
        dataplane.migrate(false)?;
        dataplane.adopt_backends()?;
        let running_nat = dataplane
            .found_link
            .then(|| dataplane.found_record.as_ref().and_then(|r| r.nat))
            .flatten();
        dataplane.adopt_nat_sources(options.host_ports, running_nat)?;
        Ok(dataplane)
    }

    /// Copies the entries of the resized tables being migrated into the new
    /// ones. The first pass (`after_switch` false) copies everything; the
    /// second, right after the program switch, copies what the old program
    /// created meanwhile, and where the new program already picked such a
    /// flow up mid-stream with another NAT port, puts the original back (the
    /// backend knows the connection by it) and frees the pickup's port. The
    /// old tables go after the second pass.
    ///
    /// # Errors
    /// A map read or write failing.
    fn migrate(&mut self, after_switch: bool) -> Result<()> {
        if self.migrating.is_empty() {
            return Ok(());
        }
        let old = std::mem::take(&mut self.migrating);
        let result = self.copy_migrating(&old, after_switch);
        if !after_switch {
            self.migrating = old;
        }
        if let Ok((copied, corrected)) = result {
            info!(
                copied,
                corrected,
                pass = if after_switch {
                    "after the switch"
                } else {
                    "before the switch"
                },
                "migrated flow table entries"
            );
        }
        result.map(|_| ())
    }

    fn copy_migrating(&mut self, old: &[OldTable], after_switch: bool) -> Result<(usize, usize)> {
        let (mut copied, mut corrected) = (0, 0);
        // Reverse entries first: a restored flow finds its own back.
        for table in old {
            if let OldTable::Reverse(old) = table {
                let entries: Vec<(NatKey, NatEntry)> = old
                    .iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_error(REVERSE_NAT_MAP))?;
                let current: HashSet<NatKey> = if after_switch {
                    self.reverse_entries()?
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect()
                } else {
                    HashSet::new()
                };
                for (key, entry) in entries.iter().filter(|(k, _)| !current.contains(k)) {
                    self.insert_reverse_entry(key, entry)?;
                    copied += 1;
                }
            }
        }
        for table in old {
            if let OldTable::Flows(old) = table {
                let entries: Vec<(FlowKey, Flow)> = old
                    .iter()
                    .collect::<Result<_, _>>()
                    .map_err(map_error(CONNTRACK_MAP))?;
                let current: HashMap<FlowKey, Flow> = if after_switch {
                    self.flows()?.into_iter().collect()
                } else {
                    HashMap::new()
                };
                for (key, flow) in entries {
                    match current.get(&key) {
                        None => {
                            self.insert_flow(&key, &flow)?;
                            copied += 1;
                        }
                        Some(now)
                            if (now.nat_addr, now.nat_port) != (flow.nat_addr, flow.nat_port) =>
                        {
                            if now.flags & ha_common::FLOW_LOCAL == 0 {
                                let backends: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
                                if let Ok(backend) = backends.get(&now.backend_id, 0) {
                                    let pickup = NatKey::new(
                                        &backend,
                                        now.nat_addr,
                                        now.nat_port,
                                        key.protocol,
                                    );
                                    let _ = self.remove_reverse_entry(&pickup);
                                }
                            }
                            self.insert_flow(&key, &flow)?;
                            corrected += 1;
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        Ok((copied, corrected))
    }

    /// The record the previous agent left in the pin directory, if any.
    pub fn found_record(&self) -> Option<&Record> {
        self.found_record.as_ref()
    }

    /// Writes `record` to the pinned record (the entries that changed); a
    /// no-op without a pin directory.
    ///
    /// # Errors
    /// A map write failing; the record then holds part of the change.
    pub fn store_record(&mut self, record: &Record) -> Result<()> {
        // The layout and the attached program are the data plane's to say.
        let mut record = record.clone();
        record.layout = Some(handover::LAYOUT_VERSION);
        if record.program.is_none() {
            record.program = self.record.program;
        }
        if record.nat.is_none() {
            record.nat = self.record.nat;
        }
        let Some(map) = self.record_map.as_mut() else {
            self.record = record;
            return Ok(());
        };
        let (old, new) = (self.record.entries(), record.entries());
        for (key, value) in &new {
            if old.get(key) != Some(value) {
                map.insert(key, value, 0).map_err(map_error(RECORD_PIN))?;
            }
        }
        for key in old.keys().filter(|k| !new.contains_key(k)) {
            map.remove(key).map_err(map_error(RECORD_PIN))?;
        }
        self.record = record;
        Ok(())
    }

    /// Whether a pinned link ran a program when this data plane was loaded
    /// (an earlier agent's, serving while this one starts).
    pub fn found_link(&self) -> bool {
        self.found_link
    }

    /// Whether [`DataPlane::attach`] has attached (or adopted) the program.
    pub fn is_attached(&self) -> bool {
        self.attachment.is_some()
    }

    /// The loaded program's tag (a SHA of its instructions, as bpftool shows it).
    pub fn program_tag(&self) -> u64 {
        self.tag
    }

    /// How this data plane came to be attached, and the tag of the program it replaced.
    pub fn start_kind(&self) -> (StartKind, Option<u64>) {
        (self.start, self.replaced_tag)
    }

    /// The NAT sources adopted flows use, kept as earlier ranges: a restart
    /// that also changed `nat.port_range` or `nat.source_address` must not
    /// hand their replies to the host's stack. The first sweep drops those
    /// the new current range covers, and the rest as their flows end.
    /// `running`: the NAT source of the program the pinned link runs (from
    /// the record), which may create flows until the switch; kept first.
    fn adopt_nat_sources(
        &mut self,
        host_ports: Option<(u16, u16)>,
        running: Option<NatRange>,
    ) -> Result<()> {
        // The reverse entries' sources, and those of flows that lost theirs.
        let mut keys: Vec<NatKey> = self
            .reverse_entries()?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        keys.extend(
            self.flows()?
                .into_iter()
                .filter(|(_, f)| f.flags & ha_common::FLOW_LOCAL == 0)
                .map(|(_, f)| NatKey {
                    lb_addr: f.nat_addr,
                    nat_port: f.nat_port,
                    ..NatKey::default()
                }),
        );
        self.earlier_nat = nat_sources_of(&keys, host_ports);
        if let Some(running) = running {
            self.earlier_nat.retain(|r| {
                !(r.addr == running.addr
                    && r.port_min >= running.port_min
                    && r.port_max <= running.port_max)
            });
            self.earlier_nat.insert(0, running);
            self.earlier_nat.truncate(NAT_RANGES - 1);
        }
        for range in &self.earlier_nat {
            info!(range = %describe_range(range), "adopted flows use this NAT source");
        }
        Ok(())
    }

    /// Backend ids from a pinned table: flows adopted with the connection
    /// table keep naming the same backends. All start retired; the first
    /// `apply` takes back the ones still configured.
    fn adopt_backends(&mut self) -> Result<()> {
        let mut found = Vec::new();
        {
            let backends: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
            for id in 0..ha_common::MAX_BACKENDS {
                let info = backends.get(&id, 0).map_err(map_error(BACKENDS_MAP))?;
                if info.addr != 0 {
                    let key = (
                        Ipv4Addr::from(addr_from_wire(info.addr)),
                        ha_common::port_from_wire(info.port),
                    );
                    found.push((key, id));
                }
            }
        }
        for (key, id) in found {
            self.backend_ids.insert(key, id);
            self.retired.insert(id);
            self.index_backend(key.0, key.1, id)?;
        }
        if !self.backend_ids.is_empty() {
            info!(
                backends = self.backend_ids.len(),
                "adopted pinned backend table"
            );
        }
        Ok(())
    }

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

    /// The loaded program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// Loads the pass-everything program from the same object (the
    /// benchmarks' floor); the agent itself never needs it.
    pub fn load_pass_program(&mut self) -> Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(ha_common::XDP_PASS_PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram)?
            .try_into()
            .map_err(DataPlaneError::Verify)?;
        if program.fd().is_err() {
            program.load().map_err(DataPlaneError::Verify)?;
        }
        Ok(())
    }

    /// The pass-everything program; [`DataPlane::load_pass_program`] first.
    pub fn pass_program(&self) -> &Xdp {
        self.ebpf
            .program(ha_common::XDP_PASS_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("the object has the pass program")
    }

    /// Empties the connection and reverse NAT tables (benchmarks between
    /// batches, the fuzzer between cases).
    pub fn clear_flows(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = {
            let table: BpfHashMap<_, FlowKey, Flow> = self.map(CONNTRACK_MAP)?;
            table.keys().filter_map(|k| k.ok()).collect()
        };
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        for key in &keys {
            let _ = table.remove(key);
        }
        let keys: Vec<NatKey> = {
            let reverse: BpfHashMap<_, NatKey, NatEntry> = self.map(REVERSE_NAT_MAP)?;
            reverse.keys().filter_map(|k| k.ok()).collect()
        };
        let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        for key in &keys {
            let _ = reverse.remove(key);
        }
        Ok(())
    }

    /// Empties every CPU's queue of recent flows (the fuzzer between cases).
    pub fn clear_embryonic_ring(&mut self) -> Result<()> {
        let slots = self.embryonic_slots;
        let mut queue: PerCpuArray<_, FlowKey> = self.map_mut(EMBRYONIC_MAP)?;
        for slot in 0..slots {
            let empty = per_cpu(FlowKey::EMPTY, EMBRYONIC_MAP)?;
            queue
                .set(slot, empty, 0)
                .map_err(map_error(EMBRYONIC_MAP))?;
        }
        let mut head: PerCpuArray<_, ha_common::QueueHead> = self.map_mut(EMBRYONIC_HEAD_MAP)?;
        let zero = per_cpu(ha_common::QueueHead::default(), EMBRYONIC_HEAD_MAP)?;
        head.set(0, zero, 0)
            .map_err(map_error(EMBRYONIC_HEAD_MAP))?;
        Ok(())
    }

    /// Fills both tables with `count` synthetic established flows
    /// (benchmarks of a large table); they name no real client and expire in an hour.
    pub fn fill_flows(&mut self, count: u32) -> Result<()> {
        let now = monotonic_coarse_ns();
        // Distinct synthetic address and port for flow i.
        let synthetic = |i: u32| {
            let addr = addr_to_wire([172, 16 + (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8]);
            (addr, (i & 0xff) as u16 + 1)
        };
        let key_of = |i: u32| {
            let (src_addr, src_port) = synthetic(i);
            FlowKey {
                src_addr,
                dst_addr: addr_to_wire([192, 0, 2, 1]),
                src_port,
                dst_port: port_to_wire(6443),
                protocol: ha_common::PROTO_TCP,
                _pad: [0; 3],
            }
        };
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        for i in 0..count {
            let (nat_addr, nat_port) = synthetic(i);
            let flow = Flow {
                flags: ha_common::FLOW_SEEN_REPLY | ha_common::FLOW_ASSURED,
                last_seen_ns: now,
                nat_addr,
                nat_port,
                ..Flow::default()
            };
            table
                .insert(key_of(i), flow, 0)
                .map_err(map_error(CONNTRACK_MAP))?;
        }
        let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        for i in 0..count {
            let (nat_addr, nat_port) = synthetic(i);
            let key = NatKey {
                backend_addr: addr_to_wire([192, 0, 2, 3]),
                lb_addr: nat_addr,
                backend_port: port_to_wire(6443),
                nat_port,
                protocol: ha_common::PROTO_TCP,
                _pad: [0; 3],
            };
            let entry = NatEntry {
                flow: key_of(i),
                created_ns: now,
                ..NatEntry::default()
            };
            reverse
                .insert(key, entry, 0)
                .map_err(map_error(REVERSE_NAT_MAP))?;
        }
        Ok(())
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// Turns on the program's aya-log output (the `debug` setting).
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map_err(|e| warn!("XDP debug log unavailable: {e}"))
            .ok()
    }

    /// Attaches to `iface` (resolved in the calling thread's network namespace)
    /// in native mode. A pinned link found at load is pointed at this program
    /// instead (bpf_link_update: one atomic switch, the interface is never
    /// without a program); otherwise a new link is made and pinned.
    ///
    /// # Errors
    /// [`DataPlaneError::GenericRefused`] for [`AttachMode::Generic`];
    /// [`DataPlaneError::Attach`] when the driver refuses native mode or the
    /// pinned link refuses the update (the old program then stays).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode> {
        if mode == AttachMode::Generic {
            return Err(DataPlaneError::GenericRefused {
                iface: iface.to_string(),
            });
        }
        let attach_error = |source| DataPlaneError::Attach {
            iface: iface.to_string(),
            mode: AttachedMode::Native.label(),
            source,
        };
        if let Some(pending) = self.pending_link.take() {
            let xdp_link =
                XdpLink::try_from(pending.link).map_err(|e| DataPlaneError::PinnedLink {
                    path: pending.path.display().to_string(),
                    reason: e.to_string(),
                })?;
            match self.program_mut().attach_to_link(xdp_link) {
                Ok(id) => {
                    let link = self.take_fd_link(id, iface)?;
                    self.start = StartKind::of(Some(pending.found.program_tag), self.tag);
                    self.replaced_tag = Some(pending.found.program_tag);
                    info!(
                        %iface,
                        from = %handover::tag_hex(pending.found.program_tag),
                        to = %handover::tag_hex(self.tag),
                        start = self.start.label(),
                        "replaced the program of the pinned XDP link in place"
                    );
                    self.attachment = Some(Attachment {
                        link,
                        pin: Some(pending.path),
                        iface: iface.to_string(),
                    });
                    self.record_program()?;
                    // The new tables are live: their pins first, then the
                    // second copy pass from the old ones (still held open).
                    self.commit_staged_pins()?;
                    self.migrate(true)?;
                    return Ok(AttachedMode::Native);
                }
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    // The interface it was made for is gone (recreated with
                    // the same name): the link serves nothing any more.
                    warn!(%iface, pin = %pending.path.display(), "the pinned XDP link is defunct (its interface was removed); attaching anew");
                    let _ = std::fs::remove_file(&pending.path);
                }
                Err(e) => return Err(attach_error(e)),
            }
        }
        let id = match self.program_mut().attach(iface, XdpMode::Driver) {
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EBUSY) =>
            {
                return Err(DataPlaneError::AlreadyAttached {
                    iface: iface.to_string(),
                });
            }
            other => other.map_err(attach_error)?,
        };
        let link = self.take_fd_link(id, iface)?;
        let (link, pin) = match &self.pin_dir {
            Some(dir) => {
                let path = dir.join(LINK_PIN);
                let pinned = link.pin(&path).map_err(|e| DataPlaneError::Pin {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                (FdLink::from(pinned), Some(path))
            }
            None => (link, None),
        };
        debug!(%iface, pinned = pin.is_some(), "XDP attached");
        self.attachment = Some(Attachment {
            link,
            pin,
            iface: iface.to_string(),
        });
        self.record_program()?;
        self.commit_staged_pins()?;
        self.migrate(true)?;
        Ok(AttachedMode::Native)
    }

    /// After the switch: the new tables take the pinned names, replacing
    /// the old ones (which the replaced program held until now).
    fn commit_staged_pins(&mut self) -> Result<()> {
        let Some(dir) = self.pin_dir.clone() else {
            return Ok(());
        };
        for name in std::mem::take(&mut self.staged_pins) {
            let (from, to) = (staged(&dir, &name), dir.join(&name));
            std::fs::rename(&from, &to).map_err(|source| DataPlaneError::PinDir {
                path: format!("{} -> {}", from.display(), to.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// Names the attached program, and the NAT source it creates flows
    /// with, in the agent record, for the next agent.
    fn record_program(&mut self) -> Result<()> {
        let mut record = self.record.clone();
        record.program = Some(handover::ProgramRecord {
            id: self.program_id,
            tag: self.tag,
        });
        record.nat = (self.settings.nat[0].addr != 0).then_some(self.settings.nat[0]);
        self.store_record(&record)
    }

    /// The link `id` as a bpf_link this data plane holds (the program no
    /// longer detaches it when dropped).
    fn take_fd_link(&mut self, id: XdpLinkId, iface: &str) -> Result<FdLink> {
        let error = |reason: String| DataPlaneError::Pin {
            path: format!("the XDP link on {iface}"),
            reason,
        };
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| error(e.to_string()))?;
        FdLink::try_from(link).map_err(|e| {
            error(format!(
                "{e}: the kernel attached without a bpf_link (netlink), which cannot outlive the agent"
            ))
        })
    }

    /// Release: removes the attachment made by [`DataPlane::attach`] and
    /// everything pinned (link, flow tables, record): the interface is left
    /// as it was before the first agent. Before [`DataPlane::attach`] (a
    /// start that failed) nothing is removed: a program attached by an
    /// earlier agent goes on serving.
    pub fn detach(&mut self) -> Result<(), std::io::Error> {
        self.pending_link = None;
        let Some(attachment) = self.attachment.take() else {
            return Ok(());
        };
        if let Some(pin) = &attachment.pin {
            remove_if_present(pin)?;
        }
        drop(attachment.link);
        debug!(iface = %attachment.iface, "XDP detached");
        if let Some(dir) = &self.pin_dir {
            remove_pins(dir)?;
        }
        Ok(())
    }

    /// Keep: lets go of the attachment without detaching. With a pin
    /// directory the program stays attached and the tables and record stay
    /// for the next agent; without one, this is [`DataPlane::detach`].
    pub fn keep(&mut self) -> Result<(), std::io::Error> {
        match self.attachment.as_ref().and_then(|a| a.pin.as_ref()) {
            Some(_) => {
                self.attachment = None;
                Ok(())
            }
            None => self.detach(),
        }
    }

    /// Interfaces the program may redirect to (XDP_REDIRECT through TX_PORTS).
    pub fn set_tx_ports(&mut self, ifindexes: &[u32]) -> Result<()> {
        let mut ports: DevMapHash<_> = self.map_mut(TX_PORTS_MAP)?;
        for ifindex in ifindexes {
            ports
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|source| DataPlaneError::TxPort {
                    ifindex: *ifindex,
                    source,
                })?;
        }
        Ok(())
    }

    /// What SETTINGS holds: the last settings applied, with the earlier NAT
    /// ranges that still have flows and the size of the queues of recent flows.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The settings `settings` would become: `nat[0]` as given, the earlier
    /// ranges this data plane keeps for live flows, the queue size.
    ///
    /// # Errors
    /// [`DataPlaneError::TooManyNatRanges`] when the NAT source changes while
    /// [`NAT_RANGES`] - 1 earlier ones still have flows: nothing is written.
    pub fn plan_settings(&self, settings: &Settings) -> Result<(Settings, Vec<NatRange>)> {
        let current = (self.settings.nat[0].addr != 0).then_some(self.settings.nat[0]);
        let earlier = next_nat_ranges(current, &self.earlier_nat, settings.nat[0])?;
        let mut planned = *settings;
        for (i, slot) in planned.nat.iter_mut().enumerate().skip(1) {
            *slot = earlier.get(i - 1).copied().unwrap_or_default();
        }
        planned.embryonic_slots = self.embryonic_slots;
        Ok((planned, earlier))
    }

    /// Writes `settings` as [`DataPlane::plan_settings`] plans them. The
    /// agent does so before it attaches the program, so that the first
    /// packets already see the NAT ranges (with those of adopted flows) and
    /// the timeouts, not a zeroed SETTINGS.
    ///
    /// # Errors
    /// As [`DataPlane::plan_settings`], or the map write failing.
    pub fn write_settings(&mut self, settings: &Settings) -> Result<()> {
        let (planned, earlier) = self.plan_settings(settings)?;
        {
            self.store_settings(&planned)?;
        }
        for range in earlier.iter().filter(|r| !self.earlier_nat.contains(r)) {
            info!(range = %describe_range(range), "earlier NAT source kept for the flows that use it");
        }
        self.settings = planned;
        self.earlier_nat = earlier;
        Ok(())
    }

    /// Writes `settings` and makes the VIP and backend tables match `vips`:
    /// new and changed VIPs get a freshly built Maglev table swapped in
    /// atomically; unchanged ones are not touched; removed ones disappear.
    /// Established flows keep their backend (their entries name it by id)
    /// and their NAT source: when `settings.nat[0]` changes, the previous
    /// range stays valid for replies until no flow uses it.
    ///
    /// # Errors
    /// Nothing is written when the settings cannot be planned
    /// ([`DataPlane::plan_settings`]) or there are too many VIPs.
    pub fn apply(&mut self, settings: &Settings, vips: &[DesiredVip]) -> Result<()> {
        if vips.len() > self.max_vips as usize {
            return Err(DataPlaneError::TooManyVips {
                wanted: vips.len(),
                max_vips: self.max_vips,
            });
        }
        self.write_settings(settings)?;

        // Backends first, so a table never names an id without a record. A
        // backend in several VIPs has one record: it is local if it is in any,
        // and down (its flows moved) only if every VIP that uses it says so.
        let mut records: BTreeMap<u32, BackendInfo> = BTreeMap::new();
        for vip in vips {
            for backend in &vip.backends {
                let id = self.backend_id(backend.address, backend.port)?;
                let record = records.entry(id).or_insert(BackendInfo {
                    addr: addr_to_wire(backend.address.octets()),
                    port: port_to_wire(backend.port),
                    flags: BACKEND_FLAG_DOWN,
                    _pad: 0,
                });
                if backend.local {
                    record.flags |= BACKEND_FLAG_LOCAL;
                }
                if !backend.down {
                    record.flags &= !BACKEND_FLAG_DOWN;
                }
            }
        }
        let in_use: HashSet<u32> = records.keys().copied().collect();
        {
            let mut map: Array<_, BackendInfo> = self.map_mut(BACKENDS_MAP)?;
            for (id, record) in &records {
                map.set(*id, record, 0).map_err(map_error(BACKENDS_MAP))?;
            }
        }
        let indexed: Vec<((Ipv4Addr, u16), u32)> = self
            .backend_ids
            .iter()
            .filter(|(_, id)| records.contains_key(id))
            .map(|(key, id)| (*key, *id))
            .collect();
        for ((address, port), id) in indexed {
            self.index_backend(address, port, id)?;
        }
        for id in self.backend_ids.values() {
            if in_use.contains(id) {
                self.retired.remove(id);
            } else if self.retired.insert(*id) {
                debug!(id, "backend retired; kept while flows use it");
            }
        }

        let wanted: HashSet<VipKey> = vips.iter().map(DesiredVip::key).collect();
        let gone: Vec<VipKey> = self
            .vips
            .keys()
            .filter(|k| !wanted.contains(k))
            .copied()
            .collect();
        for key in gone {
            let mut map: BpfHashMap<_, VipKey, VipInfo> = self.map_mut(VIPS_MAP)?;
            map.remove(&key).map_err(map_error(VIPS_MAP))?;
            if let Some(slot) = self.vips.remove(&key) {
                info!(vip = %slot.name, "VIP removed from the data plane");
            }
        }
        for vip in vips {
            self.apply_vip(vip)?;
        }
        Ok(())
    }

    /// Makes BACKEND_INDEX tell `address:port`'s packets as a backend's.
    fn index_backend(&mut self, address: Ipv4Addr, port: u16, id: u32) -> Result<()> {
        let mut index: BpfHashMap<_, BackendAddr, u32> = self.map_mut(BACKEND_INDEX_MAP)?;
        index
            .insert(backend_addr(address, port), id, 0)
            .map_err(map_error(BACKEND_INDEX_MAP))
    }

    fn backend_id(&mut self, address: Ipv4Addr, port: u16) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&(address, port)) {
            return Ok(*id);
        }
        let used: HashSet<u32> = self.backend_ids.values().copied().collect();
        let id = (0..ha_common::MAX_BACKENDS)
            .find(|id| !used.contains(id))
            .ok_or(DataPlaneError::TooManyBackends)?;
        self.backend_ids.insert((address, port), id);
        Ok(id)
    }

    fn apply_vip(&mut self, vip: &DesiredVip) -> Result<()> {
        let key = vip.key();
        let members: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .map(|b| MaglevBackend {
                address: b.address,
                port: b.port,
                weight: b.weight,
                id: self.backend_ids[&(b.address, b.port)],
            })
            .collect();
        let table = build_table(&members, self.table_size);
        let flags = if vip.enabled { VIP_FLAG_ENABLED } else { 0 };

        let (slot, half, write_table) = match self.vips.get(&key) {
            Some(existing) if existing.table == table => {
                if existing.flags == flags && existing.name == vip.name {
                    return Ok(());
                }
                (existing.slot, existing.active_half, false)
            }
            Some(existing) => (existing.slot, 1 - existing.active_half, true),
            None => {
                let taken: HashSet<u32> = self.vips.values().map(|v| v.slot).collect();
                let slot = (0..self.max_vips).find(|s| !taken.contains(s)).ok_or(
                    DataPlaneError::TooManyVips {
                        wanted: self.vips.len() + 1,
                        max_vips: self.max_vips,
                    },
                )?;
                (slot, 0, true)
            }
        };
        let offset = (slot * 2 + half) * self.table_size;
        if write_table {
            let started = std::time::Instant::now();
            let mut map: Array<_, u32> = self.map_mut(MAGLEV_MAP)?;
            for (i, id) in table.iter().enumerate() {
                map.set(offset + i as u32, id, 0)
                    .map_err(map_error(MAGLEV_MAP))?;
            }
            debug!(vip = %vip.name, half, elapsed = ?started.elapsed(), "Maglev table written to the idle half");
        }
        // The flip: one hash-map update replaces the whole value atomically.
        let info = VipInfo {
            slot,
            table_offset: offset,
            table_size: self.table_size,
            flags,
        };
        let mut map: BpfHashMap<_, VipKey, VipInfo> = self.map_mut(VIPS_MAP)?;
        map.insert(key, info, 0).map_err(map_error(VIPS_MAP))?;
        if write_table {
            info!(
                vip = %vip.name,
                backends = vip.backends.len(),
                enabled = vip.enabled,
                "Maglev table swapped in"
            );
        }
        self.vips.insert(
            key,
            VipSlot {
                name: vip.name.clone(),
                slot,
                active_half: half,
                table,
                flags,
            },
        );
        Ok(())
    }

    /// Addresses of every backend that still has a record: configured ones,
    /// and retired ones that flows may still name (freed by the sweep).
    pub fn backend_addresses(&self) -> std::collections::BTreeSet<Ipv4Addr> {
        self.backend_ids
            .keys()
            .map(|(address, _)| *address)
            .collect()
    }

    /// The backend ids that the live table of VIP `address:port/protocol` holds.
    pub fn active_table(&self, address: Ipv4Addr, port: u16, protocol: u8) -> Option<&[u32]> {
        let key = VipKey {
            addr: addr_to_wire(address.octets()),
            port: port_to_wire(port),
            protocol,
            _pad: 0,
        };
        self.vips.get(&key).map(|v| v.table.as_slice())
    }

    /// The id of backend `address:port`, if it has one.
    pub fn backend_id_of(&self, address: Ipv4Addr, port: u16) -> Option<u32> {
        self.backend_ids.get(&(address, port)).copied()
    }

    /// The agent's sweep (docs/data-path.md, "The agent's sweep"): removes
    /// ended flows with their reverse entries, puts back a live flow's lost
    /// reverse entry, frees reverse entries whose flow is gone, drops earlier
    /// NAT ranges no flow uses, and frees retired backends no flow names.
    ///
    /// # Errors
    /// A map that cannot be walked or written: the sweep stops there (what
    /// it removed so far was checked entry by entry).
    pub fn sweep_flows(&mut self, now_ns: u64) -> Result<SweepReport> {
        let planned = self.plan_sweep(now_ns)?;
        self.apply_sweep(planned)
    }

    /// The first half of [`DataPlane::sweep_flows`]: snapshots of the
    /// tables and what to change, decided from them.
    ///
    /// # Errors
    /// A map that cannot be walked: nothing is decided from part of a table.
    pub fn plan_sweep(&self, now_ns: u64) -> Result<PlannedSweep> {
        let settings = self.settings;
        let flows: Vec<(FlowKey, Flow)> = self.flows()?;
        let entries: Vec<(NatKey, NatEntry)> = self.reverse_entries()?;
        let backends: HashMap<u32, BackendInfo> = {
            let array: Array<_, BackendInfo> = self.map(BACKENDS_MAP)?;
            let ids: HashSet<u32> = flows.iter().map(|(_, f)| f.backend_id).collect();
            ids.into_iter()
                .filter_map(|id| array.get(&id, 0).ok().map(|b| (id, b)))
                .collect()
        };
        let plan = plan_sweep(&settings, &flows, &entries, &backends, now_ns);
        Ok(PlannedSweep {
            settings,
            now_ns,
            flows,
            entries,
            plan,
        })
    }

    /// The second half of [`DataPlane::sweep_flows`]: applies a plan, each
    /// removal checked again against the tables as they are now.
    ///
    /// # Errors
    /// As [`DataPlane::sweep_flows`].
    pub fn apply_sweep(&mut self, planned: PlannedSweep) -> Result<SweepReport> {
        let PlannedSweep {
            settings,
            now_ns,
            flows,
            entries,
            plan,
        } = planned;
        // Each removal is checked again against the maps as they are now: the
        // data path kept running while the snapshots were taken. (What is
        // left is the moment between that check and the delete.)
        let mut removed_flows: HashSet<FlowKey> = HashSet::new();
        {
            let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
            for key in &plan.remove_flows {
                let current = table.get(key, 0).ok();
                if flow_still_expired(key, current.as_ref(), &settings, now_ns)
                    && table.remove(key).is_ok()
                {
                    removed_flows.insert(*key);
                }
            }
        }
        let expired = removed_flows.len();
        let mut removed_reverse: HashSet<NatKey> = HashSet::new();
        let mut orphans_freed = 0;
        {
            let table: BpfHashMap<_, FlowKey, Flow> = self.map(CONNTRACK_MAP)?;
            let owners: Vec<Option<Flow>> = plan
                .remove_reverse
                .iter()
                .chain(&plan.orphans)
                .map(|(_, entry)| table.get(&entry.flow, 0).ok())
                .collect();
            let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
            let planned = plan.remove_reverse.iter().map(|p| (p, false));
            let planned = planned.chain(plan.orphans.iter().map(|p| (p, true)));
            for (((nat_key, entry), orphan), owner) in planned.zip(&owners) {
                let current = reverse.get(nat_key, 0).ok();
                if reverse_still_removable(
                    nat_key,
                    entry,
                    current.as_ref(),
                    owner.as_ref(),
                    &settings,
                    now_ns,
                ) && reverse.remove(nat_key).is_ok()
                {
                    removed_reverse.insert(*nat_key);
                    orphans_freed += usize::from(orphan);
                }
            }
        }
        let mut reverse_recovered = 0;
        {
            let mut reverse: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
            for (key, entry) in &plan.recover_reverse {
                // Only if absent (BPF_NOEXIST): the data path may have claimed it meanwhile.
                if reverse.insert(key, entry, 1).is_ok() {
                    reverse_recovered += 1;
                }
            }
        }
        let report = SweepReport {
            live: flows.len() - expired,
            expired,
            reverse_recovered,
            orphans_freed,
        };
        self.sweep_totals.add(&report);

        // Earlier NAT ranges that nothing uses any more: no reverse entry
        // left, and no flow left (a flow that lost its reverse entry still
        // needs its range, or its replies would reach the host's stack).
        if !self.earlier_nat.is_empty() {
            let reverse_left = entries
                .iter()
                .map(|(k, _)| k)
                .filter(|k| !removed_reverse.contains(k))
                .map(|k| (k.lb_addr, k.nat_port));
            let flows_left = flows
                .iter()
                .filter(|(k, f)| f.flags & ha_common::FLOW_LOCAL == 0 && !removed_flows.contains(k))
                .map(|(_, f)| (f.nat_addr, f.nat_port));
            let used = ranges_in_use(
                &settings.nat[0],
                &self.earlier_nat,
                reverse_left.chain(flows_left),
            );
            if used.iter().any(|u| !u) {
                let mut keep = Vec::new();
                for (range, used) in self.earlier_nat.iter().zip(&used) {
                    if *used {
                        keep.push(*range);
                    } else {
                        info!(range = %describe_range(range), "no flow uses the earlier NAT source any more; dropped");
                    }
                }
                let mut next = settings;
                for (i, slot) in next.nat.iter_mut().enumerate().skip(1) {
                    *slot = keep.get(i - 1).copied().unwrap_or_default();
                }
                self.store_settings(&next)?;
                self.settings = next;
                self.earlier_nat = keep;
            }
        }

        let free: Vec<u32> = self
            .retired
            .iter()
            .filter(|id| !plan.referenced.contains(id))
            .copied()
            .collect();
        for id in free {
            {
                let mut array: Array<_, BackendInfo> = self.map_mut(BACKENDS_MAP)?;
                array
                    .set(id, BackendInfo::default(), 0)
                    .map_err(map_error(BACKENDS_MAP))?;
            }
            let keys: Vec<(Ipv4Addr, u16)> = self
                .backend_ids
                .iter()
                .filter(|(_, v)| **v == id)
                .map(|(k, _)| *k)
                .collect();
            let mut index: BpfHashMap<_, BackendAddr, u32> = self.map_mut(BACKEND_INDEX_MAP)?;
            for (address, port) in &keys {
                let _ = index.remove(&backend_addr(*address, *port));
            }
            self.retired.remove(&id);
            self.backend_ids.retain(|_, v| *v != id);
            debug!(id, "retired backend freed");
        }
        Ok(report)
    }

    /// The NAT sources replies are translated for: the current one first,
    /// then earlier ones that still have flows.
    pub fn nat_sources(&self) -> Vec<NatRange> {
        std::iter::once(self.settings.nat[0])
            .chain(self.earlier_nat.iter().copied())
            .filter(|r| r.addr != 0)
            .collect()
    }

    /// What the sweeps have done since this data plane was loaded.
    pub fn sweep_totals(&self) -> SweepTotals {
        self.sweep_totals
    }

    /// Packets and bytes per verdict, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<(Verdict, Counter)>> {
        let array: PerCpuArray<_, Counter> = self.map(VERDICTS_MAP)?;
        Verdict::ALL
            .iter()
            .map(|verdict| {
                let per_cpu = array
                    .get(&(*verdict as u32), 0)
                    .map_err(map_error(VERDICTS_MAP))?;
                let mut total = Counter::default();
                per_cpu.iter().for_each(|c| total.merge(c));
                Ok((*verdict, total))
            })
            .collect()
    }

    pub fn verdict(&self, verdict: Verdict) -> Result<Counter> {
        Ok(self.verdicts()?[verdict as usize].1)
    }

    pub fn events(&self) -> Result<Vec<(Event, u64)>> {
        let array: PerCpuArray<_, u64> = self.map(EVENTS_MAP)?;
        Event::ALL
            .iter()
            .map(|event| {
                let per_cpu = array
                    .get(&(*event as u32), 0)
                    .map_err(map_error(EVENTS_MAP))?;
                Ok((*event, per_cpu.iter().sum()))
            })
            .collect()
    }

    pub fn event(&self, event: Event) -> Result<u64> {
        Ok(self.events()?[event as usize].1)
    }

    /// Per-VIP and per-backend traffic (client -> VIP direction).
    pub fn traffic(&self) -> Result<TrafficSnapshot> {
        let sum = |array: &PerCpuArray<&MapData, TrafficCounter>,
                   index: u32,
                   name: &'static str|
         -> Result<TrafficCounter> {
            let per_cpu = array.get(&index, 0).map_err(map_error(name))?;
            let mut total = TrafficCounter::default();
            per_cpu.iter().for_each(|c| total.merge(c));
            Ok(total)
        };
        let vip_stats: PerCpuArray<_, TrafficCounter> = self.map(VIP_STATS_MAP)?;
        let backend_stats: PerCpuArray<_, TrafficCounter> = self.map(BACKEND_STATS_MAP)?;
        let mut snapshot = TrafficSnapshot::default();
        let mut vips: Vec<&VipSlot> = self.vips.values().collect();
        vips.sort_by_key(|v| v.slot);
        for vip in vips {
            snapshot
                .vips
                .push((vip.name.clone(), sum(&vip_stats, vip.slot, VIP_STATS_MAP)?));
        }
        for (key, id) in &self.backend_ids {
            snapshot
                .backends
                .push((*key, sum(&backend_stats, *id, BACKEND_STATS_MAP)?));
        }
        Ok(snapshot)
    }

    /// The entries of the connection table, in one batched walk (for the
    /// sweep, status and tests; not a hot path).
    ///
    /// # Errors
    /// [`DataPlaneError::Dump`]: the walk failed; no partial table is returned.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        self.dump(CONNTRACK_MAP)
    }

    /// The entries of the reverse NAT table, as [`DataPlane::flows`].
    ///
    /// # Errors
    /// As [`DataPlane::flows`].
    pub fn reverse_entries(&self) -> Result<Vec<(NatKey, NatEntry)>> {
        self.dump(REVERSE_NAT_MAP)
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

    /// Inserts or replaces a reverse NAT entry (tests: occupy a port).
    pub fn insert_reverse_entry(&mut self, key: &NatKey, entry: &NatEntry) -> Result<()> {
        let mut table: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        table
            .insert(key, entry, 0)
            .map_err(map_error(REVERSE_NAT_MAP))
    }

    /// Removes a reverse NAT entry (tests: one half of a flow lost).
    pub fn remove_reverse_entry(&mut self, key: &NatKey) -> Result<()> {
        let mut table: BpfHashMap<_, NatKey, NatEntry> = self.map_mut(REVERSE_NAT_MAP)?;
        table.remove(key).map_err(map_error(REVERSE_NAT_MAP))
    }

    /// Removes a connection-table entry (tests: one half of a flow lost).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        table.remove(key).map_err(map_error(CONNTRACK_MAP))
    }

    /// Inserts or replaces a connection-table entry (tests).
    pub fn insert_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        table.insert(key, flow, 0).map_err(map_error(CONNTRACK_MAP))
    }

    /// Sets the time every packet sees (`Settings::clock_ns`, a virtual
    /// clock for BPF_PROG_TEST_RUN); 0 gives them the kernel's clock again.
    pub fn set_clock(&mut self, clock_ns: u64) -> Result<()> {
        let mut next = self.settings;
        next.clock_ns = clock_ns;
        self.store_settings(&next)?;
        self.settings = next;
        Ok(())
    }

    /// Writes `settings` into SETTINGS' idle slot, then makes it the live
    /// one: the data path reads whole values, old or new, never a mix (a map
    /// update of an array copies into the live value in place).
    fn store_settings(&mut self, settings: &Settings) -> Result<()> {
        let idle = 1 - self.settings_slot;
        {
            let mut map: Array<_, Settings> = self.map_mut(SETTINGS_MAP)?;
            map.set(idle, settings, 0)
                .map_err(map_error(SETTINGS_MAP))?;
        }
        let mut active: Array<_, u32> = self.map_mut(SETTINGS_ACTIVE_MAP)?;
        active
            .set(0, idle, 0)
            .map_err(map_error(SETTINGS_ACTIVE_MAP))?;
        self.settings_slot = idle;
        Ok(())
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

    /// Slots of each CPU's queue of recent flows.
    pub fn embryonic_slots(&self) -> u32 {
        self.embryonic_slots
    }
}

/// The same value for every CPU's slot of a per-CPU map.
fn per_cpu<T: aya::Pod>(value: T, map: &'static str) -> Result<PerCpuValues<T>> {
    PerCpuValues::try_from(vec![value; possible_cpus() as usize]).map_err(|e| DataPlaneError::Map {
        map,
        source: MapError::IoError(e),
    })
}

fn backend_addr(address: Ipv4Addr, port: u16) -> BackendAddr {
    BackendAddr {
        addr: addr_to_wire(address.octets()),
        port: port_to_wire(port),
        _pad: 0,
    }
}

/// What a pinned map must look like to be adopted: (kind, key size, value size, entries).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PinLayout {
    kind: aya::maps::MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

fn pinned_layout(name: &str, options: &LoadOptions) -> PinLayout {
    use aya::maps::MapType;
    use std::mem::size_of;
    let size = |n: usize| n as u32;
    match name {
        BACKENDS_MAP => PinLayout {
            kind: MapType::Array,
            key_size: 4,
            value_size: size(size_of::<BackendInfo>()),
            max_entries: ha_common::MAX_BACKENDS,
        },
        REVERSE_NAT_MAP => PinLayout {
            kind: MapType::Hash,
            key_size: size(size_of::<NatKey>()),
            value_size: size(size_of::<NatEntry>()),
            max_entries: options.reverse_entries(),
        },
        _ => PinLayout {
            kind: MapType::Hash,
            key_size: size(size_of::<FlowKey>()),
            value_size: size(size_of::<Flow>()),
            max_entries: options.table_entries(),
        },
    }
}

/// How a pinned table differs from what this build and config need.
enum Misfit {
    /// Only in its number of entries: it can be migrated.
    Entries { pinned: u32, wanted: u32 },
    /// In its kind or entry layout, or it is unreadable.
    Structure(String),
}

fn describe_resized(resized: &[(String, u32, u32)]) -> String {
    resized
        .iter()
        .map(|(name, from, to)| format!("{name} {from} -> {to} entries"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a pinned table cannot be adopted as it is (`None`: it can): its
/// kind, entry layout or size differ from what this build and config need
/// (aya would otherwise reuse it as it is, and the program would misread it).
fn pin_misfit(name: &str, path: &Path, expected: &PinLayout) -> Option<Misfit> {
    match MapData::from_pin(path).and_then(|map| map.info()) {
        Ok(info)
            if info.map_type().ok() == Some(expected.kind)
                && info.key_size() == expected.key_size
                && info.value_size() == expected.value_size =>
        {
            (info.max_entries() != expected.max_entries).then_some(Misfit::Entries {
                pinned: info.max_entries(),
                wanted: expected.max_entries,
            })
        }
        Ok(info) => Some(Misfit::Structure(format!(
            "{name} is {:?} with {}-byte keys, {}-byte values and {} entries, this build and config need {:?} with {}, {} and {}",
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            expected.kind,
            expected.key_size,
            expected.value_size,
            expected.max_entries
        ))),
        Err(e) => Some(Misfit::Structure(format!("{name} is unreadable ({e})"))),
    }
}

/// Opens the pinned agent record at `path`, or makes and pins a new one.
fn record_map(path: &Path) -> Result<RecordMap> {
    let pin_error = |reason: String| DataPlaneError::Pin {
        path: path.display().to_string(),
        reason,
    };
    if path.exists() {
        match open_record(path) {
            Ok(map) => return Ok(map),
            Err(e) => {
                warn!(pin = %path.display(), error = %e, "unreadable agent record; making a new one");
                let _ = std::fs::remove_file(path);
            }
        }
    }
    RecordMap::create(RECORD_ENTRIES, 0)
        .map_err(|e| pin_error(e.to_string()))?
        .pin(path)
        .map_err(|e| pin_error(e.to_string()))?;
    open_record(path).map_err(|e| pin_error(e.to_string()))
}

/// Where a new table is pinned until the program switch commits it.
fn staged(dir: &Path, name: &str) -> PathBuf {
    // bpffs refuses names with a dot.
    dir.join(format!("{name}_NEW"))
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes everything ha-lb pins in `dir` (link, flow tables, record) and
/// the directory if it is then empty. Removing the link's pin detaches the
/// program once no process holds the link.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    for name in [LINK_PIN, RECORD_PIN].into_iter().chain(PINNED_MAPS) {
        remove_if_present(&dir.join(name))?;
    }
    for name in PINNED_MAPS {
        remove_if_present(&staged(dir, name))?;
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use
/// memory cgroups and ignore it. Raising it is harmless either way.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer to a local struct.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if rc != 0 {
        debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{FLOW_ASSURED, FLOW_LOCAL, FLOW_SEEN_REPLY, PROTO_TCP, Timeouts};

    fn range(last: u8, min: u16, max: u16) -> NatRange {
        NatRange {
            addr: addr_to_wire([10, 0, 0, last]),
            port_min: min,
            port_max: max,
        }
    }

    #[test]
    fn a_changed_nat_source_keeps_the_previous_one_until_four_would_be_needed() {
        let (a, b, c, d, e) = (
            range(2, 10000, 32767),
            range(2, 20000, 32767),
            range(9, 20000, 32767),
            range(2, 15000, 19999),
            range(2, 5000, 9999),
        );
        assert_eq!(next_nat_ranges(None, &[], a).unwrap(), vec![]);
        assert_eq!(
            next_nat_ranges(Some(a), &[], a).unwrap(),
            vec![],
            "unchanged"
        );
        let earlier = next_nat_ranges(Some(a), &[], b).unwrap();
        assert_eq!(earlier, vec![a]);
        let earlier = next_nat_ranges(Some(b), &earlier, c).unwrap();
        assert_eq!(earlier, vec![b, a], "the newest earlier one first");
        let earlier = next_nat_ranges(Some(c), &earlier, d).unwrap();
        assert_eq!(earlier, vec![c, b, a]);
        let refused = next_nat_ranges(Some(d), &earlier, e)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("10.0.0.2:5000-9999"), "{refused}");
        assert!(refused.contains("3 earlier sources"), "{refused}");
        // Going back to an earlier range takes it out of the earlier ones.
        assert_eq!(
            next_nat_ranges(Some(d), &earlier, b).unwrap(),
            vec![d, c, a]
        );
        // A wider range on the same address covers the previous one (and any
        // earlier one inside it): no slot is kept for them.
        assert_eq!(next_nat_ranges(Some(b), &[], a).unwrap(), vec![]);
        assert_eq!(next_nat_ranges(Some(d), &[b, c], a).unwrap(), vec![c]);
    }

    #[test]
    fn adopted_reverse_entries_give_their_nat_sources_most_used_first() {
        let key = |last: u8, port: u16| NatKey {
            lb_addr: addr_to_wire([10, 0, 0, last]),
            nat_port: port_to_wire(port),
            ..NatKey::default()
        };
        let keys = [
            key(2, 12000),
            key(2, 31000),
            key(2, 15000),
            key(9, 20000),
            key(7, 20000),
            key(7, 20005),
            key(5, 40000),
        ];
        assert_eq!(
            nat_sources_of(&keys, None),
            vec![
                range(2, 12000, 31000),
                range(7, 20000, 20005),
                range(5, 40000, 40000)
            ]
        );
        assert!(nat_sources_of(&[], None).is_empty());
        // Never across the host's own ports: one source on each side.
        assert_eq!(
            nat_sources_of(&keys[..3], Some((13000, 20000))),
            vec![range(2, 12000, 12000), range(2, 31000, 31000)]
        );
        // They become the earlier ranges of the first settings applied.
        let earlier = next_nat_ranges(
            None,
            &nat_sources_of(&keys[..3], None),
            range(2, 20000, 32767),
        );
        assert_eq!(earlier.unwrap(), vec![range(2, 12000, 31000)]);
    }

    #[test]
    fn an_earlier_range_is_in_use_while_an_entry_falls_in_it_and_not_in_the_current_one() {
        let current = range(2, 20000, 32767);
        let earlier = [range(2, 10000, 32767), range(9, 20000, 32767)];
        let key = |last: u8, port: u16| NatKey {
            lb_addr: addr_to_wire([10, 0, 0, last]),
            nat_port: port_to_wire(port),
            ..NatKey::default()
        };
        let at = |key: NatKey| (key.lb_addr, key.nat_port);
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(2, 25000))]),
            vec![false, false]
        );
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(2, 12000))]),
            vec![true, false]
        );
        assert_eq!(
            ranges_in_use(&current, &earlier, [at(key(9, 25000))]),
            vec![false, true]
        );
    }

    fn settings() -> Settings {
        let g = 1_000_000_000;
        Settings {
            timeouts_ns: Timeouts {
                tcp_syn_ns: 60 * g,
                tcp_established_ns: 3600 * g,
                tcp_closing_ns: 120 * g,
                tcp_closed_ns: 5 * g,
                udp_unreplied_ns: 30 * g,
                udp_established_ns: 60 * g,
            }
            .table(),
            ..Settings::default()
        }
    }

    fn flow_key(port: u16) -> FlowKey {
        FlowKey {
            src_addr: addr_to_wire([10, 0, 0, 50]),
            dst_addr: addr_to_wire([10, 0, 0, 254]),
            src_port: port_to_wire(port),
            dst_port: port_to_wire(6443),
            protocol: PROTO_TCP,
            _pad: [0; 3],
        }
    }

    #[test]
    fn the_sweep_plan_expires_recovers_and_frees_by_the_data_paths_rules() {
        let now = 10_000 * 1_000_000_000u64;
        let backend = BackendInfo {
            addr: addr_to_wire([10, 0, 0, 11]),
            port: port_to_wire(6443),
            ..BackendInfo::default()
        };
        let backends = HashMap::from([(0, backend)]);
        let lb = addr_to_wire([10, 0, 0, 2]);
        let flow = |port: u16, flags: u32, last_seen_ns: u64| Flow {
            backend_id: 0,
            flags,
            last_seen_ns,
            nat_addr: lb,
            nat_port: port_to_wire(port),
            ..Flow::default()
        };
        let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
        let nat = |port: u16| NatKey::new(&backend, lb, port_to_wire(port), PROTO_TCP);
        let entry = |key: FlowKey, created_ns: u64| NatEntry {
            flow: key,
            backend_id: 0,
            _pad: 0,
            created_ns,
        };
        let flows = vec![
            // Live, both halves.
            (flow_key(1), flow(20001, established, now)),
            // Unanswered for over a minute: expired.
            (flow_key(2), flow(20002, 0, now - 62 * 1_000_000_000)),
            // Live, lost its reverse entry: restored.
            (flow_key(3), flow(20003, established, now)),
            // Two live flows on one port after a lost entry: neither restored.
            (flow_key(4), flow(20004, established, now)),
            (flow_key(5), flow(20004, established, now)),
            // Local: no reverse entry to have.
            (
                flow_key(6),
                Flow {
                    flags: FLOW_LOCAL | established,
                    last_seen_ns: now,
                    ..Flow::default()
                },
            ),
        ];
        let entries = vec![
            (nat(20001), entry(flow_key(1), now)),
            (nat(20002), entry(flow_key(2), now)),
            // An orphan past the grace, and one within it.
            (nat(20007), entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS)),
            (nat(20008), entry(flow_key(8), now)),
        ];
        let plan = plan_sweep(&settings(), &flows, &entries, &backends, now);
        assert_eq!(plan.remove_flows, vec![flow_key(2)]);
        assert_eq!(
            plan.remove_reverse,
            vec![(nat(20002), entry(flow_key(2), now))]
        );
        assert_eq!(
            plan.orphans,
            vec![(nat(20007), entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS))]
        );
        assert_eq!(
            plan.recover_reverse,
            vec![(nat(20003), entry(flow_key(3), now))]
        );
        assert_eq!(plan.referenced, HashSet::from([0]));

        // Checked again at delete time: a flow refreshed since the snapshot,
        // or made anew by a SYN, stays.
        let s = settings();
        let stale = flow(20002, 0, now - 62 * 1_000_000_000);
        assert!(flow_still_expired(&flow_key(2), Some(&stale), &s, now));
        let refreshed = flow(20002, 0, now - 1_000_000_000);
        assert!(!flow_still_expired(&flow_key(2), Some(&refreshed), &s, now));
        assert!(!flow_still_expired(&flow_key(2), None, &s, now));
        // A reverse entry goes only if it is the one planned and no live flow names it.
        let orphan = entry(flow_key(7), now - 2 * ORPHAN_GRACE_NS);
        let k = nat(20007);
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            None,
            &s,
            now
        ));
        let claimed = entry(flow_key(9), now);
        assert!(!reverse_still_removable(
            &k,
            &orphan,
            Some(&claimed),
            None,
            &s,
            now
        ));
        assert!(!reverse_still_removable(&k, &orphan, None, None, &s, now));
        let owner = flow(20007, established, now);
        assert!(!reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&owner),
            &s,
            now
        ));
        let elsewhere = flow(20008, established, now);
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&elsewhere),
            &s,
            now
        ));
        assert!(reverse_still_removable(
            &k,
            &orphan,
            Some(&orphan),
            Some(&stale_owner(&owner)),
            &s,
            now
        ));
    }

    fn stale_owner(flow: &Flow) -> Flow {
        Flow {
            last_seen_ns: flow.last_seen_ns - 4000 * 1_000_000_000,
            ..*flow
        }
    }
}
