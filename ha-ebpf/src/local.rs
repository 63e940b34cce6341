//! Flows to a backend on this host (docs/data-path.md, "Local backends"):
//! the client's packet is translated to the backend's address and port and
//! passed up to the host's stack, the client's source kept. The listener's
//! replies leave through the tc egress program (`egress`), which finds them
//! by the flow's reverse entry: (backend addr:port, client addr:port).

use aya_ebpf::programs::XdpContext;
use ha_common::{BackendInfo, Event, Flow, FlowKey, NatEntry, NatKey, Settings};

use crate::{
    conntrack::BPF_NOEXIST,
    maps::{REVERSE_NAT, count_event},
    nat::{Rewrite, rewrite},
    parse::Packet,
    ports::displace,
};

/// Whether a local flow translates its packets: it names its client as its
/// NAT source. A local flow left in pinned tables by a program that passed
/// them untranslated (NAT source 0:0) keeps being passed so.
#[inline(always)]
pub fn translated(key: &FlowKey, flow: &Flow) -> bool {
    flow.has_reverse(key)
}

/// Claims a new local flow's reverse entry, whose one candidate is the
/// client's own address and port at `backend`: an entry that already names
/// the flow is taken as it is (`forward_recovered`), else inserted only if
/// absent, else taken from an owner that gives it up as a NAT port's owner
/// would (5a, third pass). False: a live established flow holds it (the
/// same client address and port sent to this backend through another VIP).
///
/// `nat_key` is where the key is built: in the per-CPU scratch, off the
/// stack (this frame sits on top of the client path's, and `displace`'s on
/// top of it).
#[inline(never)]
pub fn claim(
    entry: &NatEntry,
    nat_key: &mut NatKey,
    backend: &BackendInfo,
    settings: &Settings,
) -> bool {
    let key = &entry.flow;
    *nat_key = NatKey::new(backend, key.src_addr, key.src_port, key.protocol);
    let nat_key: &NatKey = nat_key;
    // SAFETY: compared at once.
    if unsafe { REVERSE_NAT.get(nat_key) }.is_some_and(|o| o.flow.same(key)) {
        count_event(Event::ForwardRecovered);
        return true;
    }
    if REVERSE_NAT.insert(nat_key, entry, BPF_NOEXIST).is_ok() {
        return true;
    }
    count_event(Event::NatPortCollision);
    displace(nat_key, entry, settings, entry.created_ns)
}

/// Destination -> the backend's address and port; source, TTL and all else
/// kept. The checksums follow (step 5). A BPF subprogram: its rewrite
/// stays out of the client path's frame, on top of which the NAT port
/// claim runs.
#[inline(never)]
pub fn deliver(ctx: &XdpContext, packet: &Packet, backend: &BackendInfo) {
    let to = Rewrite {
        src_addr: packet.src_addr,
        dst_addr: backend.addr,
        src_port: packet.src_port,
        dst_port: backend.port,
    };
    let _ = rewrite(ctx, packet, &to);
}
