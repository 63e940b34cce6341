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
    maps::{Array, DevMapHash, HashMap as BpfHashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use ha_common::{
    BACKEND_FLAG_DOWN, BACKEND_FLAG_LOCAL, BACKEND_STATS_MAP, BACKENDS_MAP, BackendInfo,
    CONNTRACK_MAP, Counter, EVENTS_MAP, Event, FLOW_LOCAL, Flow, FlowKey, MAGLEV_MAP, NatKey,
    REVERSE_NAT_MAP, SETTINGS_MAP, Settings, TX_PORTS_MAP, TrafficCounter, VERDICTS_MAP,
    VIP_FLAG_ENABLED, VIP_STATS_MAP, VIPS_MAP, Verdict, VipInfo, VipKey, XDP_PROGRAM_NAME,
    addr_from_wire, addr_to_wire, port_to_wire,
};
use tracing::{debug, info, warn};

use crate::{
    ebpf_object::EBPF_OBJECT,
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
    #[error("attaching XDP to interface {iface} in {mode} mode: {source}")]
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
    #[error("{wanted} VIPs but the data plane was loaded with room for {max_vips}")]
    TooManyVips { wanted: usize, max_vips: u32 },
    #[error("more than {} backends", ha_common::MAX_BACKENDS)]
    TooManyBackends,
}

type Result<T, E = DataPlaneError> = std::result::Result<T, E>;

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DataPlaneError {
    move |source| DataPlaneError::Map { map, source }
}

/// How attach should pick the XDP mode. `Auto` is what operators want:
/// native (driver) mode where the driver supports it, generic with a warning otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Native,
    Generic,
}

impl AttachedMode {
    pub fn label(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        }
    }
}

/// Map sizes fixed at load time, and where to pin the tables that outlive the agent.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub maglev_table_size: u32,
    pub max_vips: u32,
    pub max_flows: u32,
    /// Pin (and adopt) the connection, reverse NAT and backend tables here.
    pub pin_dir: Option<PathBuf>,
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

/// What one sweep of the connection table found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub live: usize,
    pub expired: usize,
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct DataPlane {
    ebpf: Ebpf,
    attachment: Option<(XdpLinkId, String, AttachedMode)>,
    table_size: u32,
    max_vips: u32,
    vips: HashMap<VipKey, VipSlot>,
    backend_ids: BTreeMap<(Ipv4Addr, u16), u32>,
    /// Ids of backends no VIP uses any more; kept until no flow names them.
    retired: HashSet<u32>,
    settings: Settings,
}

impl DataPlane {
    /// Loads the embedded object and the XDP program (verifier included),
    /// adopting pinned tables where they exist and still fit.
    pub fn load(options: &LoadOptions) -> Result<Self> {
        raise_memlock_limit();
        let maglev_entries = options.maglev_table_size * 2 * options.max_vips;
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAGLEV_MAP, maglev_entries)
            .map_max_entries(CONNTRACK_MAP, options.max_flows)
            .map_max_entries(REVERSE_NAT_MAP, options.max_flows);
        let pin_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| DataPlaneError::PinDir {
                    path: dir.display().to_string(),
                    source,
                })?;
                PINNED_MAPS
                    .iter()
                    .map(|name| (*name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pin_paths {
            let expected = if *name == BACKENDS_MAP {
                ha_common::MAX_BACKENDS
            } else {
                options.max_flows
            };
            drop_incompatible_pin(path, expected);
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .ok_or(DataPlaneError::MissingProgram)?
            .try_into()
            .map_err(DataPlaneError::Verify)?;
        program.load().map_err(DataPlaneError::Verify)?;
        let mut dataplane = Self {
            ebpf,
            attachment: None,
            table_size: options.maglev_table_size,
            max_vips: options.max_vips,
            vips: HashMap::new(),
            backend_ids: BTreeMap::new(),
            retired: HashSet::new(),
            settings: Settings::default(),
        };
        dataplane.adopt_backends()?;
        Ok(dataplane)
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

    /// Empties the connection and reverse NAT tables (benchmarks, between batches).
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
            let reverse: BpfHashMap<_, NatKey, FlowKey> = self.map(REVERSE_NAT_MAP)?;
            reverse.keys().filter_map(|k| k.ok()).collect()
        };
        let mut reverse: BpfHashMap<_, NatKey, FlowKey> = self.map_mut(REVERSE_NAT_MAP)?;
        for key in &keys {
            let _ = reverse.remove(key);
        }
        Ok(())
    }

    /// Fills both tables with `count` synthetic live flows (benchmarks of a
    /// large table); they name no real client and expire in an hour.
    pub fn fill_flows(&mut self, count: u32) -> Result<()> {
        let now = monotonic_coarse_ns();
        // Distinct synthetic address and port for flow i.
        let synthetic = |i: u32| {
            let addr = addr_to_wire([172, 16 + (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8]);
            (addr, (i & 0xff) as u16 + 1)
        };
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        for i in 0..count {
            let (src_addr, src_port) = synthetic(i);
            let key = FlowKey {
                src_addr,
                dst_addr: addr_to_wire([192, 0, 2, 1]),
                src_port,
                dst_port: port_to_wire(6443),
                protocol: ha_common::PROTO_TCP,
                _pad: [0; 3],
            };
            let flow = Flow {
                last_seen_ns: now,
                ..Flow::default()
            };
            table
                .insert(key, flow, 0)
                .map_err(map_error(CONNTRACK_MAP))?;
        }
        let mut reverse: BpfHashMap<_, NatKey, FlowKey> = self.map_mut(REVERSE_NAT_MAP)?;
        for i in 0..count {
            let (backend_addr, nat_port) = synthetic(i);
            let key = NatKey {
                backend_addr,
                lb_addr: addr_to_wire([192, 0, 2, 2]),
                backend_port: port_to_wire(6443),
                nat_port,
                protocol: ha_common::PROTO_TCP,
                _pad: [0; 3],
            };
            reverse
                .insert(key, FlowKey::default(), 0)
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

    /// Attaches to `iface` (resolved in the calling thread's network namespace).
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachedMode> {
        let attach_as = |program: &mut Xdp, attached: AttachedMode| {
            let xdp_mode = match attached {
                AttachedMode::Native => XdpMode::Driver,
                AttachedMode::Generic => XdpMode::Skb,
            };
            program
                .attach(iface, xdp_mode)
                .map_err(|source| DataPlaneError::Attach {
                    iface: iface.to_string(),
                    mode: attached.label(),
                    source,
                })
        };
        let (link, attached) = match mode {
            AttachMode::Native => (
                attach_as(self.program_mut(), AttachedMode::Native)?,
                AttachedMode::Native,
            ),
            AttachMode::Generic => (
                attach_as(self.program_mut(), AttachedMode::Generic)?,
                AttachedMode::Generic,
            ),
            AttachMode::Auto => match attach_as(self.program_mut(), AttachedMode::Native) {
                Ok(link) => (link, AttachedMode::Native),
                Err(native_error) => {
                    warn!(%iface, error = %native_error, "native XDP unavailable, falling back to generic mode (slower)");
                    (
                        attach_as(self.program_mut(), AttachedMode::Generic)?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        debug!(%iface, mode = attached.label(), "XDP attached");
        self.attachment = Some((link, iface.to_string(), attached));
        Ok(attached)
    }

    /// Removes the attachment made by [`DataPlane::attach`], if any.
    pub fn detach(&mut self) -> Result<(), ProgramError> {
        if let Some((link, iface, _)) = self.attachment.take() {
            self.program_mut().detach(link)?;
            debug!(%iface, "XDP detached");
        }
        Ok(())
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

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Writes `settings` and makes the VIP and backend tables match `vips`:
    /// new and changed VIPs get a freshly built Maglev table swapped in
    /// atomically; unchanged ones are not touched; removed ones disappear.
    /// Established flows keep their backend (their entries name it by id).
    pub fn apply(&mut self, settings: &Settings, vips: &[DesiredVip]) -> Result<()> {
        if vips.len() > self.max_vips as usize {
            return Err(DataPlaneError::TooManyVips {
                wanted: vips.len(),
                max_vips: self.max_vips,
            });
        }
        {
            let mut map: Array<_, Settings> = self.map_mut(SETTINGS_MAP)?;
            map.set(0, settings, 0).map_err(map_error(SETTINGS_MAP))?;
        }
        self.settings = *settings;

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

    /// Removes connection-table entries that have ended (idle, or FIN linger
    /// over) with their reverse entries, and frees retired backends that no
    /// flow names any more.
    pub fn sweep_flows(&mut self, now_ns: u64) -> Result<SweepReport> {
        let settings = self.settings;
        let by_id: HashMap<u32, (Ipv4Addr, u16)> =
            self.backend_ids.iter().map(|(k, v)| (*v, *k)).collect();
        let mut expired = Vec::new();
        let mut live = 0;
        let mut referenced = HashSet::new();
        {
            let table: BpfHashMap<_, FlowKey, Flow> = self.map(CONNTRACK_MAP)?;
            for entry in table.iter() {
                let Ok((key, flow)) = entry else { continue };
                if flow.is_expired(key.protocol, &settings, now_ns) {
                    expired.push((key, flow));
                } else {
                    live += 1;
                    referenced.insert(flow.backend_id);
                }
            }
        }
        {
            let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
            for (key, _) in &expired {
                let _ = table.remove(key);
            }
        }
        {
            let mut reverse: BpfHashMap<_, NatKey, FlowKey> = self.map_mut(REVERSE_NAT_MAP)?;
            for (key, flow) in &expired {
                if flow.flags & FLOW_LOCAL != 0 {
                    continue;
                }
                if let Some((address, port)) = by_id.get(&flow.backend_id) {
                    let backend = BackendInfo {
                        addr: addr_to_wire(address.octets()),
                        port: port_to_wire(*port),
                        ..BackendInfo::default()
                    };
                    let _ = reverse.remove(&NatKey::new(
                        &backend,
                        settings.lb_addr,
                        flow.nat_port,
                        key.protocol,
                    ));
                }
            }
        }
        let free: Vec<u32> = self
            .retired
            .iter()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        for id in free {
            let mut backends: Array<_, BackendInfo> = self.map_mut(BACKENDS_MAP)?;
            backends
                .set(id, BackendInfo::default(), 0)
                .map_err(map_error(BACKENDS_MAP))?;
            self.retired.remove(&id);
            self.backend_ids.retain(|_, v| *v != id);
            debug!(id, "retired backend freed");
        }
        Ok(SweepReport {
            live,
            expired: expired.len(),
        })
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

    /// Live entries in the connection table (walks it: for tests and status, not hot paths).
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let table: BpfHashMap<_, FlowKey, Flow> = self.map(CONNTRACK_MAP)?;
        Ok(table.iter().filter_map(|e| e.ok()).collect())
    }

    /// Reverse NAT entries (for tests).
    pub fn reverse_entries(&self) -> Result<Vec<(NatKey, FlowKey)>> {
        let table: BpfHashMap<_, NatKey, FlowKey> = self.map(REVERSE_NAT_MAP)?;
        Ok(table.iter().filter_map(|e| e.ok()).collect())
    }

    /// Inserts a reverse NAT entry (tests use it to occupy a port).
    pub fn insert_reverse_entry(&mut self, key: &NatKey, flow: &FlowKey) -> Result<()> {
        let mut table: BpfHashMap<_, NatKey, FlowKey> = self.map_mut(REVERSE_NAT_MAP)?;
        table
            .insert(key, flow, 0)
            .map_err(map_error(REVERSE_NAT_MAP))
    }
}

/// Removes a pinned table whose size no longer matches the configuration
/// (aya would otherwise reuse it as it is). Its flows are lost, which a
/// size change needs anyway; the warning says so.
fn drop_incompatible_pin(path: &Path, expected_entries: u32) {
    if !path.exists() {
        return;
    }
    match MapData::from_pin(path).and_then(|map| map.info()) {
        Ok(info) if info.max_entries() == expected_entries => {
            info!(pin = %path.display(), "adopting pinned map");
        }
        Ok(info) => {
            warn!(
                pin = %path.display(),
                pinned = info.max_entries(),
                configured = expected_entries,
                "pinned map has another size; starting with an empty one"
            );
            let _ = std::fs::remove_file(path);
        }
        Err(e) => {
            warn!(pin = %path.display(), error = %e, "unreadable pin; replacing it");
            let _ = std::fs::remove_file(path);
        }
    }
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
