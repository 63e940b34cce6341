//! Per-CPU counters. One slot per class, summed by the agent.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use ha_common::{ProtoCounter, ProtoIndex};

#[map(name = "PROTO_COUNTERS")]
static PROTO_COUNTERS: PerCpuArray<ProtoCounter> =
    PerCpuArray::with_max_entries(ProtoIndex::COUNT, 0);

#[inline(always)]
pub fn count_protocol(class: ProtoIndex, frame_len: usize) {
    if let Some(slot) = PROTO_COUNTERS.get_ptr_mut(class as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += frame_len as u64;
        }
    }
}
