//! The tc egress program (docs/data-path.md, "Local backends"): a local
//! backend's replies, leaving through the interface the XDP program is
//! attached to, found in the one flow table by their reverse entry and sent
//! from the flow's VIP and port. XDP sees only what is received; these
//! replies are the host's own packets, so only a program on the way out can
//! translate them.
//!
//! A short pipeline of its own: parse -> classify (a local flow's reply?)
//! -> conntrack (the backend's side of the state machine, and passive
//! health: a local backend refusing a SYN) -> rewrite. It drops one packet
//! only, a refusal that passive health redispatches (`TC_ACT_SHOT`); every
//! other packet leaves (`TC_ACT_OK`), translated or untouched. Each is
//! counted in one slot of EGRESS_VERDICTS. Packets are read and written
//! through the skb helpers (bounds-checked by the kernel, fine with
//! non-linear skbs), and the checksums follow with bpf_l3_csum_replace and
//! bpf_l4_csum_replace, which keep an offloaded (CHECKSUM_PARTIAL) skb right.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use ha_common::{
    EgressVerdict, Event, FLOW_LOCAL, NatKey, PASSIVE_REASON_RST_TO_SYN, PROTO_TCP, PROTO_UDP,
    TCP_HDR_LEN_MIN, UDP_HDR_LEN_MIN,
};

use crate::{
    conntrack::{forget, now_ns, track_backend},
    maps::{CONNTRACK, REVERSE_NAT, SETTINGS, SETTINGS_ACTIVE, count_egress, count_event},
    parse::{ETH_HDR_LEN, IP_CHECK, IP_SRC, L4_SPORT, TCP_CHECK, UDP_CHECK},
    passive,
};

/// The egress program: attached at the XDP interface's egress (TCX, or
/// clsact on older kernels) by the agent, from the same object as the XDP
/// program, so both use the same maps.
#[classifier]
pub fn ha_tc_egress(ctx: TcContext) -> i32 {
    let verdict = egress(&ctx);
    count_egress(verdict, ctx.len());
    if verdict == EgressVerdict::Redispatched {
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

/// What parse finds in a TCP or UDP packet over IPv4: where its headers
/// are, its reverse key (source = backend, destination = the client) and
/// its TCP flags (0 for UDP).
struct Reply {
    l3: usize,
    l4: usize,
    key: NatKey,
    tcp_flags: u8,
}

#[inline(always)]
fn be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    ctx.load::<u16>(offset).ok().map(u16::from_be)
}

/// The egress pipeline; the verdict to count.
#[inline(always)]
fn egress(ctx: &TcContext) -> EgressVerdict {
    let reply = match parse(ctx) {
        Ok(reply) => reply,
        Err(verdict) => return verdict,
    };
    let key = &reply.key;
    // SAFETY: a map value, copied at once.
    let Some((client, backend_id)) =
        (unsafe { REVERSE_NAT.get(key) }).map(|e| (e.flow, e.backend_id))
    else {
        return EgressVerdict::Pass;
    };
    let Some(flow_ptr) = CONNTRACK.get_ptr_mut(&client) else {
        return EgressVerdict::PassNoFlow;
    };
    // SAFETY: a map value pointer, valid for this run, read in place.
    let flow = unsafe { &*flow_ptr };
    if flow.flags & FLOW_LOCAL == 0 || !flow.names(key.lb_addr, key.nat_port, backend_id) {
        return EgressVerdict::PassNoFlow;
    }
    // SAFETY: copied out at once.
    let slot = SETTINGS_ACTIVE.get(0).map_or(0, |s| *s & 1);
    let Some(settings) = SETTINGS.get(slot) else {
        return EgressVerdict::PassNoFlow;
    };
    let now = now_ns(settings);
    if flow.is_expired(client.protocol, settings, now) {
        forget(&client, flow);
        count_event(Event::ExpiredFlowReplaced);
        return EgressVerdict::PassNoFlow;
    }
    // Passive health, as on the reply path: a local backend refusing a SYN.
    if passive::refuses_syn(reply.tcp_flags, flow.flags) {
        passive::suspect(backend_id, PASSIVE_REASON_RST_TO_SYN, now);
        if passive::redispatch(&client, backend_id, now) {
            forget(&client, flow);
            return EgressVerdict::Redispatched;
        }
    }
    track_backend(flow_ptr, reply.tcp_flags, now);
    match rewrite_source(ctx, &reply, client.dst_addr, client.dst_port) {
        Some(()) => EgressVerdict::Translated,
        None => EgressVerdict::PassMalformed,
    }
}

/// docs/data-path.md, "The tc egress program", steps 1 to 5.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Reply, EgressVerdict> {
    let malformed = EgressVerdict::PassMalformed;
    let len = ctx.len() as usize;
    if len < ETH_HDR_LEN {
        return Err(malformed);
    }
    let mut ethertype = be16(ctx, 12).ok_or(malformed)?;
    let mut l3 = ETH_HDR_LEN;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(ctx, 16).ok_or(malformed)?;
        l3 = ETH_HDR_LEN + 4;
    }
    if ethertype != 0x0800 {
        return Err(EgressVerdict::Pass);
    }
    let version_ihl: u8 = ctx.load(l3).map_err(|_| malformed)?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let tot_len = usize::from(be16(ctx, l3 + 2).ok_or(malformed)?);
    if version_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > len {
        return Err(malformed);
    }
    if be16(ctx, l3 + 6).ok_or(malformed)? & 0x3fff != 0 {
        return Err(EgressVerdict::PassFragment);
    }
    let protocol: u8 = ctx.load(l3 + 9).map_err(|_| malformed)?;
    let needed = match protocol {
        PROTO_TCP => TCP_HDR_LEN_MIN,
        PROTO_UDP => UDP_HDR_LEN_MIN,
        _ => return Err(EgressVerdict::Pass),
    };
    if ihl + needed > tot_len {
        return Err(malformed);
    }
    let l4 = l3 + ihl;
    let tcp_flags = if protocol == PROTO_TCP {
        ctx.load::<u8>(l4 + 13).map_err(|_| malformed)?
    } else {
        0
    };
    let key = NatKey {
        backend_addr: ctx.load(l3 + 12).map_err(|_| malformed)?,
        lb_addr: ctx.load(l3 + 16).map_err(|_| malformed)?,
        backend_port: ctx.load(l4).map_err(|_| malformed)?,
        nat_port: ctx.load(l4 + 2).map_err(|_| malformed)?,
        protocol,
        _pad: [0; 3],
    };
    Ok(Reply {
        l3,
        l4,
        key,
        tcp_flags,
    })
}

/// Source -> `addr:port` (the VIP's), the IPv4 and L4 checksums updated by
/// the kernel's helpers: the address as part of the pseudo-header, the port
/// as data; UDP's zero checksum stays zero (and a zero result is written as
/// 0xffff).
#[inline(always)]
fn rewrite_source(ctx: &TcContext, reply: &Reply, addr: u32, port: u16) -> Option<()> {
    let (l3, l4, key) = (reply.l3, reply.l4, &reply.key);
    let (check_at, mangled) = if key.protocol == PROTO_UDP {
        (l4 + UDP_CHECK, u64::from(BPF_F_MARK_MANGLED_0))
    } else {
        (l4 + TCP_CHECK, 0)
    };
    let (old_addr, new_addr) = (u64::from(key.backend_addr), u64::from(addr));
    let (old_port, new_port) = (u64::from(key.backend_port), u64::from(port));
    ctx.l3_csum_replace(l3 + IP_CHECK, old_addr, new_addr, 4)
        .ok()?;
    ctx.l4_csum_replace(
        check_at,
        old_addr,
        new_addr,
        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
    )
    .ok()?;
    ctx.l4_csum_replace(check_at, old_port, new_port, mangled | 2)
        .ok()?;
    ctx.store(l3 + IP_SRC, &addr, 0).ok()?;
    ctx.store(l4 + L4_SPORT, &port, 0).ok()
}
