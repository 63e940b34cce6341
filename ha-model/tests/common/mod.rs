//! A small world shared by the scenario and property tests.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ha_common::{
    BACKEND_FLAG_LOCAL, BackendAddr, BackendInfo, LAST_SEEN_GRANULARITY_NS, NatRange, PROTO_TCP,
    PROTO_UDP, Settings, VIP_FLAG_ENABLED, VipInfo, VipKey, addr_to_wire, port_to_wire,
};
use ha_model::frame::FrameSpec;
use ha_model::{Config, FibAnswer, Model};

pub const G: u64 = LAST_SEEN_GRANULARITY_NS;
pub const START: u64 = 1000 * G;
pub const INGRESS: u32 = 1;

pub const LB: [u8; 4] = [10, 0, 0, 2];
pub const OLD_NAT: [u8; 4] = [10, 0, 0, 3];
pub const VIP: [u8; 4] = [10, 0, 0, 254];
pub const DISABLED_VIP: [u8; 4] = [10, 0, 0, 253];
pub const VIP_TCP_PORT: u16 = 80;
pub const VIP_UDP_PORT: u16 = 53;
pub const NAT_MIN: u16 = 20000;
pub const NAT_MAX: u16 = 20003;
pub const OLD_NAT_MIN: u16 = 30000;
pub const OLD_NAT_MAX: u16 = 30001;

/// Backends: 0 and 1 remote, 2 local (the LB itself).
pub const BACKENDS: [([u8; 4], u16); 3] =
    [([10, 0, 1, 1], 8080), ([10, 0, 1, 2], 8080), (LB, 8080)];
/// Clients: .50 routed back through ifindex 1 (TX), .51 without neighbour entry (learned MAC),
/// .52 through ifindex 3 (not in TX_PORTS).
pub const CLIENTS: [[u8; 4]; 3] = [[10, 0, 0, 50], [10, 0, 0, 51], [10, 0, 0, 52]];
pub const CLIENT_MACS: [[u8; 6]; 3] = [
    [0x02, 0xc0, 0, 0, 0, 0x50],
    [0x02, 0xc0, 0, 0, 0, 0x51],
    [0x02, 0xc0, 0, 0, 0, 0x52],
];
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x02];
pub const BACKEND_MACS: [[u8; 6]; 2] = [[0x02, 0xbe, 0, 0, 0, 1], [0x02, 0xbe, 0, 0, 0, 2]];

pub fn settings() -> Settings {
    let mut s = Settings {
        timeouts_ns: ha_common::Timeouts {
            tcp_syn_ns: 5 * G,
            tcp_established_ns: 30 * G,
            tcp_closing_ns: 10 * G,
            tcp_closed_ns: 2 * G,
            udp_unreplied_ns: 3 * G,
            udp_established_ns: 8 * G,
        }
        .table(),
        clock_ns: 0,
        embryonic_slots: 3,
        flags: 0,
        ..Settings::default()
    };
    s.nat[0] = NatRange {
        addr: addr_to_wire(LB),
        port_min: NAT_MIN,
        port_max: NAT_MAX,
    };
    s.nat[1] = NatRange {
        addr: addr_to_wire(OLD_NAT),
        port_min: OLD_NAT_MIN,
        port_max: OLD_NAT_MAX,
    };
    s
}

pub fn backend_info(id: usize) -> BackendInfo {
    let (addr, port) = BACKENDS[id];
    BackendInfo {
        addr: addr_to_wire(addr),
        port: port_to_wire(port),
        flags: if addr == LB { BACKEND_FLAG_LOCAL } else { 0 },
        _pad: 0,
    }
}

pub fn vip_key(addr: [u8; 4], port: u16, protocol: u8) -> VipKey {
    VipKey {
        addr: addr_to_wire(addr),
        port: port_to_wire(port),
        protocol,
        _pad: 0,
    }
}

/// VIP TCP :80 (slot 0, Maglev 0..7 with the local backend), VIP UDP :53 (slot 1, Maglev 7..12,
/// remote backends only), a disabled VIP (slot 2).
pub fn config() -> Config {
    let mut vips = HashMap::new();
    vips.insert(
        vip_key(VIP, VIP_TCP_PORT, PROTO_TCP),
        VipInfo {
            slot: 0,
            table_offset: 0,
            table_size: 7,
            flags: VIP_FLAG_ENABLED,
        },
    );
    vips.insert(
        vip_key(VIP, VIP_UDP_PORT, PROTO_UDP),
        VipInfo {
            slot: 1,
            table_offset: 7,
            table_size: 5,
            flags: VIP_FLAG_ENABLED,
        },
    );
    vips.insert(
        vip_key(DISABLED_VIP, VIP_TCP_PORT, PROTO_TCP),
        VipInfo {
            slot: 2,
            table_offset: 0,
            table_size: 7,
            flags: 0,
        },
    );
    let backends: Vec<BackendInfo> = (0..3).map(backend_info).collect();
    let backend_index = backends
        .iter()
        .enumerate()
        .map(|(id, b)| {
            (
                BackendAddr {
                    addr: b.addr,
                    port: b.port,
                    _pad: 0,
                },
                id as u32,
            )
        })
        .collect();
    Config {
        settings: settings(),
        vips,
        backends,
        backend_index,
        maglev: vec![0, 1, 2, 0, 1, 0, 1, 0, 1, 0, 1, 0],
        tx_ports: BTreeSet::from([1, 2]),
    }
}

pub fn model(capacity: usize) -> Model {
    Model::new(config(), ha_model::Capacity::both(capacity), 3)
}

/// The FIB of the world: backend 0 and client .50 through ifindex 1; backend 1 through 2;
/// client .51 unresolved; client .52 through 3 (not a TX port); anything else fails.
pub fn fib(_ingress: u32, _src: Ipv4Addr, dst: Ipv4Addr, _tot_len: u16) -> FibAnswer {
    let dst = dst.octets();
    let success = |ifindex, dmac| FibAnswer::Success {
        ifindex,
        smac: LB_MAC,
        dmac,
    };
    if dst == BACKENDS[0].0 {
        success(1, BACKEND_MACS[0])
    } else if dst == BACKENDS[1].0 {
        success(2, BACKEND_MACS[1])
    } else if dst == CLIENTS[0] {
        success(1, CLIENT_MACS[0])
    } else if dst == CLIENTS[1] {
        FibAnswer::NoNeighbour
    } else if dst == CLIENTS[2] {
        success(3, CLIENT_MACS[2])
    } else {
        FibAnswer::Failure
    }
}

/// A client's TCP segment to the VIP.
pub fn client_tcp(client: usize, sport: u16, flags: u8) -> FrameSpec {
    FrameSpec::tcp(CLIENTS[client], sport, VIP, VIP_TCP_PORT, flags)
        .macs(CLIENT_MACS[client], LB_MAC)
}

/// A client's UDP datagram to the VIP.
pub fn client_udp(client: usize, sport: u16) -> FrameSpec {
    FrameSpec::udp(CLIENTS[client], sport, VIP, VIP_UDP_PORT).macs(CLIENT_MACS[client], LB_MAC)
}

/// A backend's TCP segment to a NAT port.
pub fn backend_tcp(backend: usize, nat: [u8; 4], nat_port: u16, flags: u8) -> FrameSpec {
    let (addr, port) = BACKENDS[backend];
    FrameSpec::tcp(addr, port, nat, nat_port, flags).macs(BACKEND_MACS[backend % 2], LB_MAC)
}

/// A backend's UDP datagram to a NAT port.
pub fn backend_udp(backend: usize, nat: [u8; 4], nat_port: u16) -> FrameSpec {
    let (addr, port) = BACKENDS[backend];
    FrameSpec::udp(addr, port, nat, nat_port).macs(BACKEND_MACS[backend % 2], LB_MAC)
}
