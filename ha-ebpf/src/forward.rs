//! Sending a rewritten packet: the kernel's FIB gives the next hop and its
//! MAC; XDP_TX when it leaves where it came in, XDP_REDIRECT through
//! TX_PORTS otherwise.
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
    maps::{TX_PORTS, count_event},
    nat::Rewrite,
    parse::{Packet, read, write},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// How a rewritten packet may leave.
pub struct Exits {
    /// The verdicts to count for the two ways out.
    pub tx: Verdict,
    pub redirect: Verdict,
    /// Where to send if the kernel has no neighbour for the next hop (a
    /// reply, to the MAC its client's first packet came from).
    pub learned_mac: Option<[u8; 6]>,
}

/// Sends a packet rewritten to `to`. A BPF subprogram: the lookup's
/// parameters take a frame of their own.
#[inline(never)]
pub fn forward(ctx: &XdpContext, packet: &Packet, to: &Rewrite, exits: &Exits) -> (u32, Verdict) {
    let (src_addr, dst_addr) = (to.src_addr, to.dst_addr);
    let (tx, redirect, learned_mac) = (exits.tx, exits.redirect, exits.learned_mac);
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is a valid start.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    let ingress = ctx.ingress_ifindex() as u32;
    params.family = AF_INET;
    params.l4_protocol = packet.protocol;
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
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            let Some(mac) = learned_mac else {
                return (xdp_action::XDP_DROP, Verdict::DropNoNeighbour);
            };
            // Back out where the frame came in: our MAC is its destination.
            let Some(ours) = read::<[u8; 6]>(ctx, 0) else {
                return (xdp_action::XDP_DROP, Verdict::DropNoNeighbour);
            };
            if write(ctx, 0, mac).is_none() || write(ctx, 6, ours).is_none() {
                return (xdp_action::XDP_DROP, Verdict::DropNoNeighbour);
            }
            count_event(Event::ReplyToLearnedMac);
            return (xdp_action::XDP_TX, tx);
        }
        _ => return (xdp_action::XDP_DROP, Verdict::DropFibFailure),
    }
    if write(ctx, 0, params.dmac).is_none() || write(ctx, 6, params.smac).is_none() {
        return (xdp_action::XDP_DROP, Verdict::DropFibFailure);
    }
    // A tagged frame goes back out on its own VLAN (one-arm), even though the
    // FIB names the VLAN device rather than the interface XDP runs on.
    if params.ifindex == ingress || packet.vlan_tagged {
        return (xdp_action::XDP_TX, tx);
    }
    match TX_PORTS.redirect(params.ifindex, 0) {
        Ok(action) => (action, redirect),
        Err(_) => (xdp_action::XDP_DROP, Verdict::DropNoTxPort),
    }
}
