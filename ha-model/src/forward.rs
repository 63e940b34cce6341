//! Step 6, **Forward** (docs/data-path.md, "6. Forward"): the TTL, then the FIB lookup on the
//! new addresses decides the MACs and the action; the frame is rewritten (step 5) only when it
//! is sent on, and answered with an ICMP error when it cannot be.

use std::net::Ipv4Addr;

use ha_common::{Event, Verdict, addr_from_wire};

use crate::icmp::{self, IcmpError};
use crate::nat::{Rewrite, decrement_ttl, rewrite};
use crate::parse::Packet;
use crate::{Ctx, Fib, FibAnswer, XDP_DROP, XDP_REDIRECT, XDP_TX};

/// The verdicts a forwarded frame counts as: `forward_tx`/`forward_redirect` for a client
/// packet, `reply_tx`/`reply_redirect` for a backend reply, and the `icmp_` pairs for
/// translated ICMP errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The verdict of `XDP_TX`.
    pub tx: Verdict,
    /// The verdict of `XDP_REDIRECT`.
    pub redirect: Verdict,
}

impl Sent {
    /// A client packet to its backend.
    pub const FORWARD: Sent = Sent {
        tx: Verdict::ForwardTx,
        redirect: Verdict::ForwardRedirect,
    };
    /// A backend reply to its client.
    pub const REPLY: Sent = Sent {
        tx: Verdict::ReplyTx,
        redirect: Verdict::ReplyRedirect,
    };
    /// An ICMP error from the client's side, to the flow's backend.
    pub const ICMP_FORWARD: Sent = Sent {
        tx: Verdict::IcmpForwardTx,
        redirect: Verdict::IcmpForwardRedirect,
    };
    /// An ICMP error from the backend's side, to the flow's client.
    pub const ICMP_REPLY: Sent = Sent {
        tx: Verdict::IcmpReplyTx,
        redirect: Verdict::IcmpReplyRedirect,
    };
}

/// What step 6 needs to know of the frame it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    /// Offset of the (outer) IPv4 header.
    pub l3: usize,
    /// One VLAN tag.
    pub tagged: bool,
    /// The (outer) IPv4 total length.
    pub tot_len: u16,
    /// The frame is an ICMP error being translated (never answered with another).
    pub icmp_error: bool,
}

impl Hop {
    /// A TCP or UDP packet.
    pub fn of(packet: &Packet) -> Hop {
        Hop {
            l3: packet.l3,
            tagged: packet.tagged,
            tot_len: packet.tot_len,
            icmp_error: false,
        }
    }

    /// An ICMP error.
    pub fn of_error(error: &IcmpError) -> Hop {
        Hop {
            l3: error.l3,
            tagged: error.tagged,
            tot_len: error.tot_len,
            icmp_error: true,
        }
    }
}

/// Step 5, applied once step 6 decides the frame is sent on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translate {
    /// A TCP/UDP packet: its addresses and ports become the rewrite's.
    Packet(Packet, Rewrite),
    /// An ICMP error: outer addresses (`outer`'s ports unused) and the embedded packet's.
    IcmpError {
        /// The parsed error.
        error: IcmpError,
        /// New outer addresses.
        outer: Rewrite,
        /// New embedded addresses and ports.
        inner: Rewrite,
    },
}

impl Translate {
    /// The new (outer) addresses.
    fn to(&self) -> &Rewrite {
        match self {
            Translate::Packet(_, to) => to,
            Translate::IcmpError { outer, .. } => outer,
        }
    }

    fn apply(&self, frame: &mut [u8], hop: &Hop) {
        // Cannot fail on a frame the packet or the error was parsed from.
        let _ = match self {
            Translate::Packet(packet, to) => rewrite(frame, packet, to),
            Translate::IcmpError {
                error,
                outer,
                inner,
            } => icmp::translate(frame, error, outer, inner),
        };
        let _ = decrement_ttl(frame, hop.l3);
    }
}

/// "An answer" may be sent (RFC 1812 section 4.3.2.7): the destination MAC is not a group
/// address (`f[0] & 1 == 0`) and the source address's first octet is not 0, 127 or 224 and above.
fn answerable(frame: &[u8], l3: usize) -> bool {
    let unicast_mac = frame.first().is_some_and(|b| b & 1 == 0);
    let first = frame.get(l3 + 12).copied().unwrap_or(0);
    unicast_mac && first != 0 && first != 127 && first < 224
}

fn set_macs(frame: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    if let Some(d) = frame.get_mut(0..6) {
        d.copy_from_slice(&dst);
    }
    if let Some(s) = frame.get_mut(6..12) {
        s.copy_from_slice(&src);
    }
}

impl Ctx<'_> {
    /// Step 6 for a TCP/UDP `packet` to be rewritten to `to` (steps 5 and 6 of sections 3
    /// and 4).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_packet(
        &mut self,
        frame: &mut Vec<u8>,
        packet: &Packet,
        to: Rewrite,
        ingress: u32,
        fib: &dyn Fib,
        learned_mac: Option<[u8; 6]>,
        sent: Sent,
    ) -> (u32, Verdict) {
        let translate = Translate::Packet(*packet, to);
        self.forward(
            frame,
            &Hop::of(packet),
            &translate,
            ingress,
            fib,
            learned_mac,
            sent,
        )
    }

    /// Step 6 for `frame` (described by `hop`), which came in on `ingress`; step 5
    /// (`translate`) is applied only when the frame is sent on.
    ///
    /// - TTL (`f[l3+8]`) 0 or 1: an ICMP error being translated, or a packet that may not be
    ///   answered, is dropped (`drop_ttl_exceeded`); any other packet is answered with time
    ///   exceeded (`icmp_time_exceeded_tx`, `XDP_TX`);
    /// - success: translated, the TTL taken one from, the lookup's MACs; `XDP_TX` when the
    ///   egress is `ingress` or the frame is tagged, else `XDP_REDIRECT` if the egress is in
    ///   `TX_PORTS`, else `drop_no_tx_port`;
    /// - no neighbour: with `learned_mac`, translated, destination MAC = it, source MAC = the
    ///   frame's original destination MAC, `reply_to_learned_mac`, `XDP_TX`; without,
    ///   `drop_no_neighbour`;
    /// - fragmentation needed: with DF, not an ICMP error and answerable, answered with
    ///   fragmentation needed and the MTU (`icmp_frag_needed_tx`, `XDP_TX`); else
    ///   `drop_frag_needed`;
    /// - the other answers: their own drop verdicts.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        frame: &mut Vec<u8>,
        hop: &Hop,
        translate: &Translate,
        ingress: u32,
        fib: &dyn Fib,
        learned_mac: Option<[u8; 6]>,
        sent: Sent,
    ) -> (u32, Verdict) {
        let ttl = frame.get(hop.l3 + 8).copied().unwrap_or(0);
        if ttl <= 1 {
            if hop.icmp_error || !answerable(frame, hop.l3) {
                return (XDP_DROP, Verdict::DropTtlExceeded);
            }
            icmp::answer(frame, hop.l3, icmp::TIME_EXCEEDED, 0, 0);
            return (XDP_TX, Verdict::IcmpTimeExceededTx);
        }
        let to = translate.to();
        let src = Ipv4Addr::from(addr_from_wire(to.src_addr));
        let dst = Ipv4Addr::from(addr_from_wire(to.dst_addr));
        match fib.lookup(ingress, src, dst, hop.tot_len) {
            FibAnswer::Success {
                ifindex,
                smac,
                dmac,
            } => {
                translate.apply(frame, hop);
                set_macs(frame, dmac, smac);
                if ifindex == ingress || hop.tagged {
                    (XDP_TX, sent.tx)
                } else if self.config.tx_ports.contains(&ifindex) {
                    (XDP_REDIRECT, sent.redirect)
                } else {
                    (XDP_DROP, Verdict::DropNoTxPort)
                }
            }
            FibAnswer::NoNeighbour => match learned_mac {
                Some(mac) => {
                    let mut original_dst = [0u8; 6];
                    if let Some(d) = frame.get(0..6) {
                        original_dst.copy_from_slice(d);
                    }
                    translate.apply(frame, hop);
                    set_macs(frame, mac, original_dst);
                    self.count_event(Event::ReplyToLearnedMac);
                    (XDP_TX, sent.tx)
                }
                None => (XDP_DROP, Verdict::DropNoNeighbour),
            },
            FibAnswer::FragNeeded { mtu } => {
                let df = frame.get(hop.l3 + 6).is_some_and(|b| b & 0x40 != 0);
                if hop.icmp_error || !df || !answerable(frame, hop.l3) {
                    return (XDP_DROP, Verdict::DropFragNeeded);
                }
                icmp::answer(frame, hop.l3, icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu);
                (XDP_TX, Verdict::IcmpFragNeededTx)
            }
            FibAnswer::NoRoute => (XDP_DROP, Verdict::DropNoRoute),
            FibAnswer::Blackhole => (XDP_DROP, Verdict::DropRouteBlackhole),
            FibAnswer::Unreachable => (XDP_DROP, Verdict::DropRouteUnreachable),
            FibAnswer::Prohibit => (XDP_DROP, Verdict::DropRouteProhibit),
            FibAnswer::ForwardingDisabled => (XDP_DROP, Verdict::DropForwardingDisabled),
            FibAnswer::Failure => (XDP_DROP, Verdict::DropFibFailure),
        }
    }
}
