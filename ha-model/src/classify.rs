//! Step 2, **Classify** (docs/data-path.md, "2. Classify"), and the *live NAT port* test
//! ("Maps", `Settings.nat`).

use ha_common::{
    BackendAddr, NatEntry, NatKey, Settings, Verdict, VipInfo, VipKey, port_from_wire,
};

use crate::Ctx;
use crate::parse::{L4, Packet};

/// What a parsed packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A client packet to a VIP (section 3), with the VIP's value.
    ToVip(VipInfo),
    /// A backend reply (section 4), found in `REVERSE_NAT` as `entry` under `nat_key`.
    Reply {
        /// The key it was found under: (src, dst, sport, dport, protocol) of the packet.
        nat_key: NatKey,
        /// The reverse entry.
        entry: NatEntry,
    },
    /// `XDP_PASS` with this verdict.
    Pass(Verdict),
    /// `XDP_DROP` with this verdict.
    Drop(Verdict),
}

/// To a *live NAT port*: `addr` equals `nat[i].addr` and `port` (wire order; compared in host
/// order) is within `nat[i].port_min..=port_max`, for some `i` with `addr != 0`.
pub fn is_live_nat_port(settings: &Settings, addr: u32, port: u16) -> bool {
    let port = port_from_wire(port);
    settings.nat.iter().any(|range| {
        range.addr != 0 && range.addr == addr && (range.port_min..=range.port_max).contains(&port)
    })
}

impl Ctx<'_> {
    /// Step 2 for `packet`.
    pub fn classify(&self, packet: &Packet) -> Class {
        let protocol = packet.protocol();
        let vip_key = VipKey {
            addr: packet.dst_addr,
            port: packet.dst_port,
            protocol,
            _pad: 0,
        };
        if let Some(vip) = self.config.vips.get(&vip_key) {
            return Class::ToVip(*vip);
        }
        if is_live_nat_port(&self.config.settings, packet.dst_addr, packet.dst_port) {
            let nat_key = NatKey {
                backend_addr: packet.src_addr,
                lb_addr: packet.dst_addr,
                backend_port: packet.src_port,
                nat_port: packet.dst_port,
                protocol,
                _pad: [0; 3],
            };
            if let Some(entry) = self.state.reverse.get(&nat_key) {
                return Class::Reply {
                    nat_key,
                    entry: *entry,
                };
            }
            let source = BackendAddr {
                addr: packet.src_addr,
                port: packet.src_port,
                _pad: 0,
            };
            if self.config.backend_index.contains_key(&source) {
                return Class::Drop(Verdict::DropReplyNoFlow);
            }
        }
        Class::Pass(match packet.l4_proto {
            L4::Tcp { .. } => Verdict::PassTcp,
            L4::Udp => Verdict::PassUdp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{NatRange, addr_to_wire, port_to_wire};

    #[test]
    fn live_nat_ports() {
        let a = addr_to_wire([10, 0, 0, 2]);
        let mut s = Settings::default();
        s.nat[0] = NatRange {
            addr: a,
            port_min: 20000,
            port_max: 20003,
        };
        s.nat[3] = NatRange {
            addr: a,
            port_min: 100,
            port_max: 100,
        };
        assert!(is_live_nat_port(&s, a, port_to_wire(20000)));
        assert!(is_live_nat_port(&s, a, port_to_wire(20003)));
        assert!(!is_live_nat_port(&s, a, port_to_wire(20004)));
        assert!(!is_live_nat_port(&s, a, port_to_wire(19999)));
        assert!(is_live_nat_port(&s, a, port_to_wire(100)));
        assert!(!is_live_nat_port(
            &s,
            addr_to_wire([10, 0, 0, 3]),
            port_to_wire(20001)
        ));
        // An unused range (addr 0) matches nothing, not even address 0.
        s.nat[1] = NatRange {
            addr: 0,
            port_min: 0,
            port_max: 65535,
        };
        assert!(!is_live_nat_port(&s, 0, port_to_wire(5)));
        // An inverted range is empty.
        s.nat[2] = NatRange {
            addr: a,
            port_min: 600,
            port_max: 500,
        };
        assert!(!is_live_nat_port(&s, a, port_to_wire(550)));
    }
}
