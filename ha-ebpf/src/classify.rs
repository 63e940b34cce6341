//! Is this packet ours? A client packet to a VIP, a backend's reply to one
//! of our NAT ports, or neither (passed to the kernel untouched).

use ha_common::{FlowKey, NatKey, Settings, VipInfo, VipKey, port_from_wire};

use crate::{
    maps::{REVERSE_NAT, VIPS},
    parse::Packet,
};

pub enum Class {
    /// Client -> VIP.
    ToVip(VipInfo),
    /// Backend -> LB NAT port: the client flow it belongs to, and the reverse key.
    Reply(FlowKey, NatKey),
    NotOurs,
}

#[inline(always)]
pub fn classify(packet: &Packet, settings: &Settings) -> Class {
    let vip_key = VipKey {
        addr: packet.dst_addr,
        port: packet.dst_port,
        protocol: packet.protocol,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; the agent replaces whole values.
    if let Some(vip) = unsafe { VIPS.get(vip_key) } {
        return Class::ToVip(*vip);
    }
    if packet.dst_addr == settings.lb_addr {
        let port = port_from_wire(packet.dst_port);
        if port >= settings.nat_port_min && port <= settings.nat_port_max {
            let nat_key = NatKey {
                backend_addr: packet.src_addr,
                lb_addr: packet.dst_addr,
                backend_port: packet.src_port,
                nat_port: packet.dst_port,
                protocol: packet.protocol,
                _pad: [0; 3],
            };
            // SAFETY: copied out at once.
            if let Some(flow) = unsafe { REVERSE_NAT.get(nat_key) } {
                return Class::Reply(*flow, nat_key);
            }
        }
    }
    Class::NotOurs
}
