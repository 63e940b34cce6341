//! Sending a packet on: its TTL checked, the kernel's FIB asked for the
//! next hop, its MAC and the MTU; the frame rewritten; XDP_TX when it
//! leaves where it came in, XDP_REDIRECT through TX_PORTS otherwise. What
//! cannot be forwarded is answered with the ICMP error a router sends, or
//! dropped and counted by the FIB's reason.
//!
//! `bpf_fib_lookup` refuses to answer unless IPv4 forwarding is enabled on
//! the ingress interface (whatever the flags), so the agent switches it on
//! for the interface it attaches to, and restores it on exit.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup_helper,
    programs::XdpContext,
};
use ha_common::{Event, Verdict};

use crate::{
    Send, icmp,
    maps::{TX_PORTS, count_event},
    nat,
    parse::{IP_DF, IP_FRAG, IP_TTL, IPPROTO_ICMP, Packet, read, write},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNREACHABLE: i64 = 2;
const BPF_FIB_LKUP_RET_PROHIBIT: i64 = 3;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;
const BPF_FIB_LKUP_RET_FWD_DISABLED: i64 = 5;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// How a rewritten packet may leave.
pub struct Exits {
    /// The verdicts to count for the two ways out.
    pub tx: Verdict,
    pub redirect: Verdict,
    /// Where to send if the kernel has no neighbour for the next hop (a
    /// reply, to the MAC its client's first packet came from).
    pub learned_mac: Option<[u8; 6]>,
}

#[inline(always)]
fn drop(verdict: Verdict) -> (u32, Verdict) {
    (xdp_action::XDP_DROP, verdict)
}

/// Rewrites the frame as `send` says (a TCP/UDP packet, or an ICMP error
/// and the packet it embeds) and takes one from its TTL.
#[inline(always)]
fn rewrite(ctx: &XdpContext, packet: &Packet, send: &Send) -> Option<()> {
    if packet.icmp_error {
        icmp::rewrite(ctx, packet, &send.to, &send.inner)?;
    } else {
        nat::rewrite(ctx, packet, &send.to)?;
    }
    nat::decrement_ttl(ctx, packet)
}

/// Sends a packet as `send` says. A BPF subprogram: the lookup's parameters
/// take a frame of their own. The TTL is checked first (an expired one is
/// answered with time exceeded), then the FIB is asked about the new
/// addresses; the frame is rewritten only when it is sent on.
#[inline(never)]
pub fn forward(ctx: &XdpContext, packet: &Packet, send: &Send) -> (u32, Verdict) {
    let (action, verdict, error) = route(ctx, packet, send);
    if error == 0 {
        return (action, verdict);
    }
    // One place that answers with an ICMP error (one call to verify).
    let (icmp_type, code, mtu) = ((error >> 24) as u8, (error >> 16) as u8, error as u16);
    match icmp::answer(ctx, packet, icmp_type, code, mtu) {
        Some(()) => (xdp_action::XDP_TX, verdict),
        None => drop(verdict_if_unanswered(icmp_type)),
    }
}

#[inline(always)]
fn verdict_if_unanswered(icmp_type: u8) -> Verdict {
    if icmp_type == icmp::TIME_EXCEEDED {
        Verdict::DropTtlExceeded
    } else {
        Verdict::DropFragNeeded
    }
}

/// Whether a packet may be answered with an ICMP error (RFC 1812 section
/// 4.3.2.7): not one sent to a link-layer broadcast or multicast address,
/// nor one whose source is not a unicast host (0/8, 127/8, multicast,
/// 240/4 and the limited broadcast).
#[inline(always)]
fn answerable(ctx: &XdpContext, packet: &Packet) -> bool {
    let group_mac = read::<[u8; 2]>(ctx, 0).is_none_or(|mac| mac[0] & 1 != 0);
    let first = packet.src_addr.to_ne_bytes()[0];
    !group_mac && first != 0 && first != 127 && first < 224
}

/// An ICMP error to answer with: type, code and MTU in one word.
#[inline(always)]
fn error(icmp_type: u8, code: u8, mtu: u16) -> u32 {
    (u32::from(icmp_type) << 24) | (u32::from(code) << 16) | u32::from(mtu)
}

/// The action and verdict, or (with a nonzero third value) the ICMP error
/// to answer with instead.
#[inline(always)]
fn route(ctx: &XdpContext, packet: &Packet, send: &Send) -> (u32, Verdict, u32) {
    let (src_addr, dst_addr) = (send.to.src_addr, send.to.dst_addr);
    let exits = &send.exits;
    let (tx, redirect, learned_mac) = (exits.tx, exits.redirect, exits.learned_mac);
    let l3 = packet.l3();
    // Read with the protocol byte: a 1-byte read at a variable offset
    // becomes a `>=` bounds test that the verifier cannot follow.
    let ttl = read::<[u8; 2]>(ctx, l3 + IP_TTL).map_or(0, |w| w[0]);
    if ttl <= 1 {
        if packet.icmp_error || !answerable(ctx, packet) {
            return (xdp_action::XDP_DROP, Verdict::DropTtlExceeded, 0);
        }
        let answer = error(icmp::TIME_EXCEEDED, 0, 0);
        return (xdp_action::XDP_TX, Verdict::IcmpTimeExceededTx, answer);
    }
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid start.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let ingress = ctx.ingress_ifindex() as u32;
    params.family = AF_INET;
    params.l4_protocol = if packet.icmp_error {
        IPPROTO_ICMP
    } else {
        packet.protocol
    };
    params.__bindgen_anon_1.tot_len = packet.ip_total_len;
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = src_addr;
    params.__bindgen_anon_4.ipv4_dst = dst_addr;
    // SAFETY: params is a valid, correctly sized struct for the helper.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let refused = |verdict| (xdp_action::XDP_DROP, verdict, 0);
    let (dmac, smac, learned) = match rc {
        BPF_FIB_LKUP_RET_SUCCESS => (params.dmac, params.smac, false),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            let Some(mac) = learned_mac else {
                return refused(Verdict::DropNoNeighbour);
            };
            // Back out where the frame came in: our MAC is its destination.
            let Some(ours) = read::<[u8; 6]>(ctx, 0) else {
                return refused(Verdict::DropNoNeighbour);
            };
            (mac, ours, true)
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            let frag = read::<[u8; 2]>(ctx, l3 + IP_FRAG).map_or(0, u16::from_be_bytes);
            if packet.icmp_error || frag & IP_DF == 0 || !answerable(ctx, packet) {
                return refused(Verdict::DropFragNeeded);
            }
            // SAFETY: the helper set mtu_result for this answer.
            let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
            let answer = error(icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu);
            return (xdp_action::XDP_TX, Verdict::IcmpFragNeededTx, answer);
        }
        BPF_FIB_LKUP_RET_NOT_FWDED => return refused(Verdict::DropNoRoute),
        BPF_FIB_LKUP_RET_BLACKHOLE => return refused(Verdict::DropRouteBlackhole),
        BPF_FIB_LKUP_RET_UNREACHABLE => return refused(Verdict::DropRouteUnreachable),
        BPF_FIB_LKUP_RET_PROHIBIT => return refused(Verdict::DropRouteProhibit),
        BPF_FIB_LKUP_RET_FWD_DISABLED => return refused(Verdict::DropForwardingDisabled),
        _ => return refused(Verdict::DropFibFailure),
    };
    if rewrite(ctx, packet, send).is_none()
        || write(ctx, 0, dmac).is_none()
        || write(ctx, 6, smac).is_none()
    {
        return refused(Verdict::DropFibFailure);
    }
    if learned {
        count_event(Event::ReplyToLearnedMac);
        return (xdp_action::XDP_TX, tx, 0);
    }
    // A tagged frame goes back out on its own VLAN (one-arm), even though the
    // FIB names the VLAN device rather than the interface XDP runs on.
    if params.ifindex == ingress || packet.vlan_tagged {
        return (xdp_action::XDP_TX, tx, 0);
    }
    match TX_PORTS.redirect(params.ifindex, 0) {
        Ok(action) => (action, redirect, 0),
        Err(_) => refused(Verdict::DropNoTxPort),
    }
}
