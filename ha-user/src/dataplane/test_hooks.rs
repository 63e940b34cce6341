//! What only the tests, the benchmarks and the fuzzer use (crates `ha-tests`
//! and `ha-bench`, which enable the `test-hooks` feature; docs/development.md): the loaded
//! programs for BPF_PROG_TEST_RUN, a virtual clock, synthetic and emptied
//! tables, fixture surgery on one half of a flow, host-local backend ids,
//! and the XDP object `HA_LB_XDP_OBJECT` names loaded instead of the
//! embedded one (the upgrade test). The agent never calls any of it.

use std::{net::Ipv4Addr, path::PathBuf};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapError, PerCpuArray, PerCpuValues, RingBuf},
    programs::Xdp,
};
use ha_common::{
    CONNTRACK_MAP, Counter, EMBRYONIC_HEAD_MAP, EMBRYONIC_MAP, Flow, FlowKey, NatEntry, NatKey,
    PASSIVE_EVENTS_MAP, PassiveEvent, REDISPATCHED_MAP, REVERSE_NAT_MAP, SUSPECT_MAP, Verdict,
    VipKey, XDP_PROGRAM_NAME, addr_to_wire, port_to_wire,
};
use tracing::warn;

use super::{DataPlane, DataPlaneError, Result, map_error, monotonic_coarse_ns, possible_cpus};

/// The XDP object `HA_LB_XDP_OBJECT` names, when it is set: the upgrade test
/// runs the same `ha-user` with another build of the program.
pub(super) fn object_override() -> Result<Option<Vec<u8>>> {
    let Some(path) = std::env::var_os("HA_LB_XDP_OBJECT") else {
        return Ok(None);
    };
    let bytes = std::fs::read(&path).map_err(|source| DataPlaneError::Object {
        path: PathBuf::from(&path).display().to_string(),
        source,
    })?;
    warn!(object = %PathBuf::from(path).display(), "loading the XDP object HA_LB_XDP_OBJECT names, not the embedded one");
    Ok(Some(bytes))
}

/// The same value for every CPU's slot of a per-CPU map.
fn per_cpu<T: aya::Pod>(value: T, map: &'static str) -> Result<PerCpuValues<T>> {
    PerCpuValues::try_from(vec![value; possible_cpus() as usize]).map_err(|e| DataPlaneError::Map {
        map,
        source: MapError::IoError(e),
    })
}

impl DataPlane {
    /// The loaded program, for BPF_PROG_TEST_RUN in tests and benchmarks.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() checked the program exists and is XDP")
    }

    /// The loaded tc egress program, for BPF_PROG_TEST_RUN.
    pub fn egress_program(&self) -> &aya::programs::SchedClassifier {
        self.ebpf
            .program(ha_common::TC_EGRESS_PROGRAM_NAME)
            .and_then(|p| p.try_into().ok())
            .expect("load() loaded the egress program")
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
            super::load_program(program).map_err(DataPlaneError::Verify)?;
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

    /// Removes a connection-table entry (tests: one half of a flow lost).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        let mut table: BpfHashMap<_, FlowKey, Flow> = self.map_mut(CONNTRACK_MAP)?;
        table.remove(key).map_err(map_error(CONNTRACK_MAP))
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

    /// Packets and bytes of one verdict, summed over CPUs.
    pub fn verdict(&self, verdict: Verdict) -> Result<Counter> {
        Ok(self.verdicts()?[verdict as usize].1)
    }

    /// SUSPECT[id]: when the data path suspected backend `id` (0: not suspect).
    pub fn suspect_since(&self, id: u32) -> Result<u64> {
        let suspect: Array<_, u64> = self.map(SUSPECT_MAP)?;
        suspect.get(&id, 0).map_err(map_error(SUSPECT_MAP))
    }

    /// Every SUSPECT entry, by backend id (the fuzzer compares them all).
    pub fn suspect_entries(&self) -> Result<Vec<u64>> {
        let suspect: Array<_, u64> = self.map(SUSPECT_MAP)?;
        suspect
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_error(SUSPECT_MAP))
    }

    /// Writes SUSPECT[id] (0 clears it), as the agent does.
    pub fn set_suspect_since(&mut self, id: u32, at_ns: u64) -> Result<()> {
        let mut suspect: Array<_, u64> = self.map_mut(SUSPECT_MAP)?;
        suspect.set(id, at_ns, 0).map_err(map_error(SUSPECT_MAP))
    }

    /// Clears every SUSPECT entry (the fuzzer between cases).
    pub fn clear_suspects(&mut self) -> Result<()> {
        let mut suspect: Array<_, u64> = self.map_mut(SUSPECT_MAP)?;
        for id in 0..suspect.len() {
            suspect.set(id, 0, 0).map_err(map_error(SUSPECT_MAP))?;
        }
        Ok(())
    }

    /// The REDISPATCHED entries: flow keys redispatched, and when.
    pub fn redispatched_flows(&self) -> Result<Vec<(FlowKey, u64)>> {
        self.dump(REDISPATCHED_MAP)
    }

    /// Empties REDISPATCHED (the fuzzer between cases).
    pub fn clear_redispatched(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = self
            .redispatched_flows()?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut table: BpfHashMap<_, FlowKey, u64> = self.map_mut(REDISPATCHED_MAP)?;
        for key in &keys {
            let _ = table.remove(key);
        }
        Ok(())
    }

    /// Takes every record waiting in the PASSIVE_EVENTS ring, oldest first.
    pub fn take_passive_events(&mut self) -> Result<Vec<PassiveEvent>> {
        let mut ring: RingBuf<_> = self.map_mut(PASSIVE_EVENTS_MAP)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if item.len() >= std::mem::size_of::<PassiveEvent>() {
                // SAFETY: the data path writes whole PassiveEvent records
                // (repr(C), plain integers); read unaligned from the ring's bytes.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
        Ok(events)
    }

    /// Slots of each CPU's queue of recent flows.
    pub fn embryonic_slots(&self) -> u32 {
        self.embryonic_slots
    }
}
