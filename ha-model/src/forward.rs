//! Step 6, **Forward** (docs/data-path.md, "6. Forward"): the FIB lookup on the rewritten
//! addresses decides the MACs and the action.

use std::net::Ipv4Addr;

use ha_common::{Event, Verdict, addr_from_wire};

use crate::nat::Rewrite;
use crate::parse::Packet;
use crate::{Ctx, Fib, FibAnswer, XDP_DROP, XDP_REDIRECT, XDP_TX};

/// The verdicts a forwarded frame counts as: `forward_tx`/`forward_redirect` for a client
/// packet, `reply_tx`/`reply_redirect` for a backend reply.
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
    /// Step 6 for the rewritten `frame` (new addresses in `to`), which came in on `ingress`.
    ///
    /// - success: the lookup's MACs; `XDP_TX` when the egress is `ingress` or the frame is
    ///   tagged, else `XDP_REDIRECT` if the egress is in `TX_PORTS`, else `drop_no_tx_port`;
    /// - no neighbour: with `learned_mac`, destination MAC = it, source MAC = the frame's
    ///   original destination MAC, `reply_to_learned_mac`, `XDP_TX`; without,
    ///   `drop_no_neighbour`;
    /// - anything else: `drop_fib_failure`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        frame: &mut [u8],
        packet: &Packet,
        to: &Rewrite,
        ingress: u32,
        fib: &dyn Fib,
        learned_mac: Option<[u8; 6]>,
        sent: Sent,
    ) -> (u32, Verdict) {
        let src = Ipv4Addr::from(addr_from_wire(to.src_addr));
        let dst = Ipv4Addr::from(addr_from_wire(to.dst_addr));
        match fib.lookup(ingress, src, dst, packet.tot_len) {
            FibAnswer::Success {
                ifindex,
                smac,
                dmac,
            } => {
                set_macs(frame, dmac, smac);
                if ifindex == ingress || packet.tagged {
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
                    set_macs(frame, mac, original_dst);
                    self.count_event(Event::ReplyToLearnedMac);
                    (XDP_TX, sent.tx)
                }
                None => (XDP_DROP, Verdict::DropNoNeighbour),
            },
            FibAnswer::Failure => (XDP_DROP, Verdict::DropFibFailure),
        }
    }
}
