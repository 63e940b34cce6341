//! Is this packet ours? A client packet to a VIP, a backend's reply to one
//! of our NAT ports, a backend's packet to a NAT port whose flow is gone, or
//! none of these (passed to the kernel untouched). docs/data-path.md, "2. Classify".

use ha_common::{BackendAddr, NatEntry, NatKey, Settings, VipInfo, VipKey};

use crate::{
    maps::{BACKEND_INDEX, REVERSE_NAT, VIPS},
    parse::Packet,
};

/// A reverse entry found for a backend's packet.
pub struct Owner {
    pub nat_key: NatKey,
    /// Into REVERSE_NAT, valid for this program run (not copied: the stack
    /// is 512 bytes for the whole call chain).
    pub entry: *const NatEntry,
}

pub enum Class {
    /// Client -> VIP.
    ToVip(VipInfo),
    /// Backend -> live NAT port with a reverse entry.
    Reply(Owner),
    /// A backend's packet to a live NAT port that no flow owns. Handed to
    /// the host's stack it would be answered with an RST, killing a flow
    /// that could still recover, so it is dropped.
    ReplyNoFlow,
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
    if !settings.is_nat_port(packet.dst_addr, packet.dst_port) {
        return Class::NotOurs;
    }
    let nat_key = NatKey {
        backend_addr: packet.src_addr,
        lb_addr: packet.dst_addr,
        backend_port: packet.src_port,
        nat_port: packet.dst_port,
        protocol: packet.protocol,
        _pad: [0; 3],
    };
    if let Some(entry) = REVERSE_NAT.get_ptr(&nat_key) {
        return Class::Reply(Owner { nat_key, entry });
    }
    let backend = BackendAddr {
        addr: packet.src_addr,
        port: packet.src_port,
        _pad: 0,
    };
    // SAFETY: only tested for presence.
    if unsafe { BACKEND_INDEX.get(backend) }.is_some() {
        return Class::ReplyNoFlow;
    }
    Class::NotOurs
}
