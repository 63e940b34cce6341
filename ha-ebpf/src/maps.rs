//! Every map of the data path. Sizes marked "set by the agent" are
//! placeholders that the loader replaces (`EbpfLoader::set_max_entries`).
//! None is pinned here: the agent pins the connection, reverse NAT and
//! backend tables by path when it runs for real, so a restart adopts them
//! and established flows keep their backend and port (tests load unpinned).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use ha_common::{
    BackendInfo, Counter, Event, Flow, FlowKey, MAX_BACKENDS, MAX_VIPS, NatKey, Settings,
    TrafficCounter, Verdict, VipInfo, VipKey,
};

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Backend ids, `MAX_VIPS * 2` tables of M entries (set by the agent).
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::with_max_entries(1, 0);

/// Client flow -> backend and NAT port (size set by the agent).
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1, 0);

/// (backend, LB address, NAT port) -> client flow (size set by the agent).
#[map(name = "REVERSE_NAT")]
pub static REVERSE_NAT: LruHashMap<NatKey, FlowKey> = LruHashMap::with_max_entries(1, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Interfaces a packet may be redirected to, keyed by ifindex.
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

#[map(name = "VERDICTS")]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Verdict::COUNT, 0);

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
