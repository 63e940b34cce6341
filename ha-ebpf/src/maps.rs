//! Every map of the data path (docs/data-path.md, "Maps"). Sizes marked "set
//! by the agent" are placeholders that the loader replaces
//! (`EbpfLoader::set_max_entries`). None is pinned here: the agent pins the
//! connection, reverse NAT and backend tables by path when it runs for real,
//! so a restart adopts them and established flows keep their backend and
//! port (tests load unpinned).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use ha_common::{
    BackendAddr, BackendInfo, Counter, EgressVerdict, Event, Flow, FlowKey, MAX_BACKENDS, MAX_VIPS,
    NatEntry, NatKey, PASSIVE_EVENTS_BYTES, QueueHead, REDISPATCHED_ENTRIES, Settings,
    TrafficCounter, Verdict, VipInfo, VipKey,
};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend ids, `MAX_VIPS * 2` tables of M entries (set by the agent).
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// (address, port) -> backend id: tells a backend's packets from others'.
#[map(name = "BACKEND_INDEX")]
pub static BACKEND_INDEX: HashMap<BackendAddr, u32> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Client flow -> backend, NAT source and state (size set by the agent).
/// A plain hash, not LRU: the kernel never evicts an entry on its own, so a
/// flow never loses one of its two halves; the data path evicts only flows
/// that are not established.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: HashMap<FlowKey, Flow> = HashMap::with_max_entries(1, 0);

/// (backend, NAT address, NAT port) -> client flow (size set by the agent).
#[map(name = "REVERSE_NAT")]
pub static REVERSE_NAT: HashMap<NatKey, NatEntry> = HashMap::with_max_entries(1, 0);

/// Per CPU, a queue of the keys of the flows it created, oldest first: where
/// a full table finds a flow that is not established to evict (size set by
/// the agent).
#[map(name = "EMBRYONIC")]
pub static EMBRYONIC: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "EMBRYONIC_HEAD")]
pub static EMBRYONIC_HEAD: PerCpuArray<QueueHead> = PerCpuArray::with_max_entries(1, 0);

/// Passive health (docs/data-path.md, "Passive health"): per backend id,
/// the clock at which the data path saw it refuse a new flow (0: not
/// suspect). Set here, cleared by the agent once its confirming check passes.
#[map(name = "SUSPECT")]
pub static SUSPECT: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// One `PassiveEvent` each time a backend becomes suspect, for the agent to
/// confirm by an active check at once.
#[map(name = "PASSIVE_EVENTS")]
pub static PASSIVE_EVENTS: RingBuf = RingBuf::with_byte_size(PASSIVE_EVENTS_BYTES, 0);

/// Flow keys whose refused SYN was redispatched, and when: each is
/// redispatched at most once per `REDISPATCH_WINDOW_NS`.
#[map(name = "REDISPATCHED")]
pub static REDISPATCHED: LruHashMap<FlowKey, u64> =
    LruHashMap::with_max_entries(REDISPATCHED_ENTRIES, 0);

/// Two slots: the agent writes the idle one, then flips [`SETTINGS_ACTIVE`]
/// to it, so a packet never reads a value half written.
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(2, 0);

/// Which slot of [`SETTINGS`] is live (0 or 1).
#[map(name = "SETTINGS_ACTIVE")]
pub static SETTINGS_ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Interfaces a packet may be redirected to, keyed by ifindex.
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Per CPU, the per-packet values too large for the 512 bytes of stack
/// that the whole call chain shares: the parsed packet and what to send.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

pub struct Scratch {
    pub packet: crate::parse::Packet,
    pub send: crate::Send,
    /// The frame's length as counted (see `process`).
    pub frame_len: usize,
}

#[map(name = "VERDICTS")]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

/// The tc egress program's verdicts (every packet it sees counts in one).
#[map(name = "EGRESS_VERDICTS")]
pub static EGRESS_VERDICTS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(EgressVerdict::COUNT, 0);

#[inline(always)]
pub fn count_egress(verdict: EgressVerdict, len: u32) {
    if let Some(slot) = EGRESS_VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += u64::from(len);
        }
    }
}

#[map(name = "EVENTS")]
pub static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Event::COUNT, 0);

#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<TrafficCounter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficCounter> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[inline(always)]
pub fn count_verdict(verdict: Verdict, frame_len: usize) {
    if let Some(slot) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += frame_len as u64;
        }
    }
}

#[inline(always)]
pub fn count_event(event: Event) {
    if let Some(slot) = EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += 1 }
    }
}

#[inline(always)]
pub fn count_traffic(
    map: &PerCpuArray<TrafficCounter>,
    index: u32,
    frame_len: usize,
    new_flow: bool,
) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += frame_len as u64;
            if new_flow {
                (*slot).new_flows += 1;
            }
        }
    }
}
