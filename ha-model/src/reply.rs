//! Section 4, **A backend reply** (docs/data-path.md, "4. A backend reply"): a packet found in
//! `REVERSE_NAT` as `e` under `nk`.

use ha_common::{
    Event, FLOW_LOCAL, FLOW_RESET, Flow, NatEntry, NatKey, PASSIVE_REASON_RST_TO_SYN, Verdict,
};

use crate::client::screen;
use crate::ctx::Update;
use crate::flow::{backend_bits, names, refresh};
use crate::forward::Sent;
use crate::nat::Rewrite;
use crate::parse::Packet;
use crate::passive::refuses_syn;
use crate::{Ctx, Fib, XDP_DROP};

impl Ctx<'_> {
    /// Section 4 for `packet`, found as `entry` under `nat_key`; `frame` is rewritten in place
    /// when forwarded.
    pub fn backend_reply(
        &mut self,
        packet: &Packet,
        nat_key: NatKey,
        entry: NatEntry,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        // 1.
        if let Some(verdict) = screen(packet) {
            return (XDP_DROP, verdict);
        }
        // 2.
        let client = entry.flow;
        match self.flow(&client) {
            None => {
                // A local backend's flow is never rebuilt here (its replies leave by tc egress).
                let source_matches = self.backend(entry.backend_id).is_some_and(|backend| {
                    backend.addr == packet.src_addr
                        && backend.port == packet.src_port
                        && backend.flags & ha_common::BACKEND_FLAG_LOCAL == 0
                });
                if !source_matches {
                    return (XDP_DROP, Verdict::DropReplyNoFlow);
                }
                let rebuilt = Flow {
                    backend_id: entry.backend_id,
                    flags: 0,
                    last_seen_ns: self.now,
                    nat_addr: nat_key.lb_addr,
                    nat_port: nat_key.nat_port,
                    client_mac: [0; 6],
                    _pad: 0,
                };
                if !self.insert_new_flow(client, rebuilt, Update::NoExist) {
                    return (XDP_DROP, Verdict::DropTableFull);
                }
                self.count_event(Event::ForwardRecovered);
            }
            Some(flow)
                if flow.flags & FLOW_LOCAL != 0
                    || !names(&flow, nat_key.lb_addr, nat_key.nat_port, entry.backend_id) =>
            {
                return (XDP_DROP, Verdict::DropReplyNoFlow);
            }
            Some(flow) if self.expired(&client, &flow) => {
                self.forget(&client, &flow);
                self.count_event(Event::ExpiredFlowReplaced);
                return (XDP_DROP, Verdict::DropReplyNoFlow);
            }
            // Passive health: the backend refused the flow's SYN.
            Some(flow) if refuses_syn(packet.flags(), flow.flags) => {
                self.suspect(entry.backend_id, PASSIVE_REASON_RST_TO_SYN);
                if self.redispatch(&client, entry.backend_id) {
                    self.forget(&client, &flow);
                    return (XDP_DROP, Verdict::DropRedispatched);
                }
            }
            Some(_) => {}
        }
        // 3.
        let now = self.now;
        let Some(flow) = self.state.conntrack.get_mut(&client) else {
            // Not reachable: present or just inserted.
            return (XDP_DROP, Verdict::DropReplyNoFlow);
        };
        let was_reset = flow.flags & FLOW_RESET != 0;
        refresh(flow, backend_bits(packet.flags()), now);
        let (client_mac, reset) = (flow.client_mac, flow.flags & FLOW_RESET != 0);
        if reset && !was_reset {
            self.count_event(Event::FlowReset);
        }
        let to = Rewrite {
            src_addr: client.dst_addr,
            dst_addr: client.src_addr,
            src_port: client.dst_port,
            dst_port: client.src_port,
        };
        let learned = (client_mac != [0; 6]).then_some(client_mac);
        self.forward_packet(frame, packet, to, ingress, fib, learned, Sent::REPLY)
    }
}
