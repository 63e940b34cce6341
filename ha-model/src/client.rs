//! Section 3, **A client packet to a VIP** (docs/data-path.md, "3. A client packet to a VIP"):
//! steps 1 to 5, with the existing-flow path (4) and the new-flow path (5).
//!
//! Choices where the spec leaves room:
//! - `midstream_pickup` is counted for every *created* TCP flow whose first packet is not a
//!   bare SYN, an RST included (the spec lists an RST first packet as its own case, "created
//!   already closed", without saying whether it is also a pickup; `ha_common::Event`'s doc says
//!   "a TCP flow whose first packet was not a bare SYN").
//! - Step 4's `reverse_recovered` is counted only when the insert succeeds (it can fail when
//!   `REVERSE_NAT` is full), as in the sweep ("success counts as reverse recovered").
//! - A new flow's insert (`CONNTRACK[key]`) always meets an absent key: step 3 removed any old
//!   entry, and 5a/5b only ever forget *other* keys; so "replacing any entry" and "only if
//!   absent" behave alike, and it fails only when the table is full.

use ha_common::hash::flow_hash;
use ha_common::{
    BACKEND_FLAG_LOCAL, BackendInfo, Event, FLOW_LOCAL, FLOW_RESET, Flow, FlowKey, NatKey,
    PROTO_TCP, Verdict, VipInfo,
};

use crate::ctx::Update;
use crate::flow::{
    client_bits, first_packet_bits, has_reverse, is_bare_syn, refresh, tcp_flags_valid,
};
use crate::forward::Sent;
use crate::nat::Rewrite;
use crate::parse::Packet;
use crate::select::PortOwner;
use crate::{Ctx, Fib, XDP_DROP, XDP_PASS};

/// The client flow key of `packet` (src, dst = VIP, sport, dport = VIP port, protocol).
pub fn client_key(packet: &Packet) -> FlowKey {
    FlowKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        protocol: packet.protocol(),
        _pad: [0; 3],
    }
}

/// The checks a packet to a VIP or a NAT port goes through before its flow is looked at
/// (section 3 step 2, section 4 step 1): options, first fragment, invalid TCP flags.
pub fn screen(packet: &Packet) -> Option<Verdict> {
    if packet.options {
        Some(Verdict::DropVipIpOptions)
    } else if packet.first_fragment {
        Some(Verdict::DropVipFragment)
    } else if packet.is_tcp() && !tcp_flags_valid(packet.flags()) {
        Some(Verdict::DropInvalidTcpFlags)
    } else {
        None
    }
}

impl Ctx<'_> {
    /// Section 3 for `packet` to the VIP `vip`; `frame` is rewritten in place when forwarded.
    pub fn client_to_vip(
        &mut self,
        packet: &Packet,
        vip: VipInfo,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        // 1.
        if vip.flags & ha_common::VIP_FLAG_ENABLED == 0 {
            return (XDP_PASS, Verdict::PassVipDisabled);
        }
        // 2.
        if let Some(verdict) = screen(packet) {
            return (XDP_DROP, verdict);
        }
        // 3.
        let key = client_key(packet);
        if let Some(flow) = self.flow(&key) {
            match self.stale_reason(&key, &flow, packet) {
                Some(event) => {
                    self.count_event(event);
                    self.forget(&key, &flow);
                }
                // 4.
                None => return self.existing_flow(packet, vip, key, frame, ingress, fib),
            }
        }
        // 5.
        self.new_flow(packet, vip, key, frame, ingress, fib)
    }

    /// Step 4, **existing flow**.
    fn existing_flow(
        &mut self,
        packet: &Packet,
        vip: VipInfo,
        key: FlowKey,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        let now = self.now;
        let Some(entry) = self.state.conntrack.get_mut(&key) else {
            // Not reachable: the caller found the entry.
            return (XDP_DROP, Verdict::DropStaleBackend);
        };
        let add = client_bits(entry.flags, packet.flags());
        let was_reset = entry.flags & FLOW_RESET != 0;
        let refreshed = refresh(entry, add, now);
        let flow = *entry;
        if flow.flags & FLOW_RESET != 0 && !was_reset {
            self.count_event(Event::FlowReset);
        }

        let Some(backend) = self.backend(flow.backend_id) else {
            return (XDP_DROP, Verdict::DropStaleBackend);
        };
        if backend.addr == 0 {
            return (XDP_DROP, Verdict::DropStaleBackend);
        }
        if flow.flags & FLOW_LOCAL != 0 {
            self.count_traffic(vip.slot, flow.backend_id, frame.len(), false);
            // A local flow left untranslated by an earlier program stays so.
            if !has_reverse(&key, &flow) {
                return (XDP_PASS, Verdict::PassLocalBackend);
            }
        }
        if refreshed
            && let Some(nat_key) = self.nat_key_of(&key, &flow)
            && !self.state.reverse.contains_key(&nat_key)
        {
            let entry = self.nat_entry(key, flow.backend_id);
            if self.put_reverse(nat_key, entry, Update::NoExist) {
                self.count_event(Event::ReverseRecovered);
            }
        }
        if flow.flags & FLOW_LOCAL != 0 {
            return self.deliver_locally(packet, &backend, frame);
        }
        self.count_traffic(vip.slot, flow.backend_id, frame.len(), false);
        self.send_to_backend(packet, &flow, &backend, frame, ingress, fib)
    }

    /// A local flow's packet: destination -> the backend's address and port (its source, TTL
    /// and all else kept, the checksums updated as by step 5), passed up to the host.
    fn deliver_locally(
        &mut self,
        packet: &Packet,
        backend: &BackendInfo,
        frame: &mut [u8],
    ) -> (u32, Verdict) {
        let to = Rewrite {
            src_addr: packet.src_addr,
            dst_addr: backend.addr,
            src_port: packet.src_port,
            dst_port: backend.port,
        };
        let _ = crate::nat::rewrite(frame, packet, &to);
        (XDP_PASS, Verdict::PassLocalBackend)
    }

    /// A new local flow's reverse entry: (backend, client address, backend port, client port).
    /// Its one candidate is the client's own address and port: an entry naming `key` is taken
    /// as it is (`forward_recovered`); else inserted only if absent; else (counting
    /// `nat_port_collision`) taken from an owner that gives it up as in 5a's third pass.
    fn claim_local(&mut self, key: FlowKey, backend_id: u32, backend: BackendInfo) -> bool {
        let nat_key = NatKey {
            backend_addr: backend.addr,
            lb_addr: key.src_addr,
            backend_port: backend.port,
            nat_port: key.src_port,
            protocol: key.protocol,
            _pad: [0; 3],
        };
        if self.port_owner(&nat_key, &key) == PortOwner::Own {
            self.count_event(Event::ForwardRecovered);
            return true;
        }
        let mine = self.nat_entry(key, backend_id);
        if self.put_reverse(nat_key, mine, Update::NoExist) {
            return true;
        }
        self.count_event(Event::NatPortCollision);
        self.displace_owner(&nat_key, &key, mine)
    }

    /// Rewrite to (`nat_addr`:`nat_port` -> backend addr:port) and forward with no learned MAC.
    fn send_to_backend(
        &mut self,
        packet: &Packet,
        flow: &Flow,
        backend: &BackendInfo,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        let to = Rewrite {
            src_addr: flow.nat_addr,
            dst_addr: backend.addr,
            src_port: flow.nat_port,
            dst_port: backend.port,
        };
        self.forward_packet(frame, packet, to, ingress, fib, None, Sent::FORWARD)
    }

    /// Step 5, **new flow**.
    fn new_flow(
        &mut self,
        packet: &Packet,
        vip: VipInfo,
        key: FlowKey,
        frame: &mut Vec<u8>,
        ingress: u32,
        fib: &dyn Fib,
    ) -> (u32, Verdict) {
        let hash = flow_hash(&key);
        let Some((backend_id, backend)) = self.select_backend(&vip, hash, true) else {
            return (XDP_DROP, Verdict::DropNoBackend);
        };
        let flags = packet.flags();
        let initial = first_packet_bits(flags);
        let midstream = key.protocol == PROTO_TCP && !is_bare_syn(flags);

        if backend.flags & BACKEND_FLAG_LOCAL != 0 {
            if !self.claim_local(key, backend_id, backend) {
                return (XDP_DROP, Verdict::DropNatExhausted);
            }
            let flow = Flow {
                backend_id,
                flags: FLOW_LOCAL | initial,
                last_seen_ns: self.now,
                nat_addr: key.src_addr,
                nat_port: key.src_port,
                client_mac: [0; 6],
                _pad: 0,
            };
            if !self.insert_new_flow(key, flow, Update::Any) {
                if let Some(nat_key) = self.nat_key_of(&key, &flow)
                    && self
                        .state
                        .reverse
                        .get(&nat_key)
                        .is_some_and(|entry| entry.flow == key)
                {
                    self.state.reverse.remove(&nat_key);
                }
                return (XDP_DROP, Verdict::DropTableFull);
            }
            self.count_created(midstream, initial);
            self.count_traffic(vip.slot, backend_id, frame.len(), true);
            return self.deliver_locally(packet, &backend, frame);
        }

        let Some(nat_key) = self.claim_nat_port(key, hash, backend_id, backend, midstream) else {
            return (XDP_DROP, Verdict::DropNatExhausted);
        };
        let mut client_mac = [0u8; 6];
        if let Some(mac) = frame.get(6..12) {
            client_mac.copy_from_slice(mac);
        }
        let flow = Flow {
            backend_id,
            flags: initial,
            last_seen_ns: self.now,
            nat_addr: self.config.settings.nat[0].addr,
            nat_port: nat_key.nat_port,
            client_mac,
            _pad: 0,
        };
        if !self.insert_new_flow(key, flow, Update::Any) {
            if self
                .state
                .reverse
                .get(&nat_key)
                .is_some_and(|entry| entry.flow == key)
            {
                self.state.reverse.remove(&nat_key);
            }
            return (XDP_DROP, Verdict::DropTableFull);
        }
        self.count_created(midstream, initial);
        self.count_traffic(vip.slot, backend_id, frame.len(), true);
        self.send_to_backend(packet, &flow, &backend, frame, ingress, fib)
    }

    /// `new_flow`, `midstream_pickup` for a TCP first packet that is not a bare SYN, and
    /// `flow_reset` for one that is an RST (the flow is born closed).
    fn count_created(&mut self, midstream: bool, initial: u32) {
        self.count_event(Event::NewFlow);
        if midstream {
            self.count_event(Event::MidstreamPickup);
        }
        if initial & FLOW_RESET != 0 {
            self.count_event(Event::FlowReset);
        }
    }
}
