//! The one builder of test frames: Ethernet (optionally one VLAN tag), IPv4,
//! then TCP, UDP or ICMP. The fixtures, the end-to-end flood and the
//! benchmark build their frames here. Every checksum is computed by
//! etherparse: an independent implementation, not the code under test (the
//! fuzzer's frames come from the reference model's own builder instead,
//! `ha_model::frame`).
//!
//! ```
//! use ha_lab::packet::{Frame, SYN};
//! let frame = Frame {
//!     src_mac: [2, 0, 0, 0, 0, 1],
//!     dst_mac: [2, 0, 0, 0, 0, 2],
//!     vlan: None,
//!     src: [10, 0, 0, 1].into(),
//!     dst: [10, 0, 0, 2].into(),
//!     sport: 40000,
//!     dport: 6443,
//!     l4: SYN,
//!     payload: b"",
//! };
//! assert_eq!(frame.build().len(), 54);
//! assert_eq!(frame.forwarded()[22], 63); // the TTL, one hop later
//! ```

use std::net::Ipv4Addr;

use etherparse::{PacketBuilder, VlanId};

/// The transport header of a [`Frame`].
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    Udp {
        zero_checksum: bool,
    },
}

pub const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
pub const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
pub const SYN_ACK: L4 = L4::Tcp {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
pub const RST: L4 = L4::Tcp {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};
pub const FIN: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};
pub const UDP: L4 = L4::Udp {
    zero_checksum: false,
};
pub const UDP_NO_CHECKSUM: L4 = L4::Udp {
    zero_checksum: true,
};

/// The TTL of every built frame; a forwarded frame leaves with one less.
pub const TTL: u8 = 64;
/// The sequence number of a TCP frame unless given ([`Frame::build_with`]).
pub const SEQ: u32 = 1000;

/// A TCP or UDP frame: window 64240, acknowledgment number 5000 when ACK is
/// set, the IPv4 header as etherparse makes it (DF set, no options).
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: &'static [u8],
}

impl Frame {
    /// The frame with TTL [`TTL`].
    pub fn build(&self) -> Vec<u8> {
        self.build_with_ttl(TTL)
    }

    /// As the balancer sends it on: one hop later.
    pub fn forwarded(&self) -> Vec<u8> {
        self.build_with_ttl(TTL - 1)
    }

    pub fn build_with_ttl(&self, ttl: u8) -> Vec<u8> {
        self.build_with(ttl, SEQ)
    }

    /// The frame with IPv4 TTL `ttl` and, for TCP, sequence number `seq`.
    pub fn build_with(&self, ttl: u8, seq: u32) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let mut out = Vec::new();
        macro_rules! finish {
            ($ip:expr) => {{
                let ip = $ip;
                match self.l4 {
                    L4::Tcp { syn, ack, fin, rst } => {
                        let mut tcp = ip.tcp(self.sport, self.dport, seq, 64240);
                        if syn {
                            tcp = tcp.syn();
                        }
                        if ack {
                            tcp = tcp.ack(5000);
                        }
                        if fin {
                            tcp = tcp.fin();
                        }
                        if rst {
                            tcp = tcp.rst();
                        }
                        tcp.write(&mut out, self.payload).unwrap();
                    }
                    L4::Udp { .. } => ip
                        .udp(self.sport, self.dport)
                        .write(&mut out, self.payload)
                        .unwrap(),
                }
            }};
        }
        match self.vlan {
            Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).unwrap()).ipv4(
                self.src.octets(),
                self.dst.octets(),
                ttl
            )),
            None => finish!(eth.ipv4(self.src.octets(), self.dst.octets(), ttl)),
        }
        if let L4::Udp {
            zero_checksum: true,
        } = self.l4
        {
            let l4 = 14 + self.vlan.map_or(0, |_| 4) + 20;
            out[l4 + 6] = 0;
            out[l4 + 7] = 0;
        }
        out
    }
}

/// An ICMP message in a frame, built by etherparse (which computes the IPv4
/// and ICMP checksums). `generated`: as the balancer builds its own errors
/// (no DF, precedence "internetwork control").
#[allow(clippy::too_many_arguments)]
pub fn icmp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    generated: bool,
    icmp: etherparse::Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(
        0,
        ttl,
        etherparse::IpNumber::ICMP,
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    if generated {
        ip.dont_fragment = false;
        ip.dscp = etherparse::Ipv4Dscp::try_new(0xc0 >> 2).unwrap();
    }
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(icmp)
        .write(&mut out, quote)
        .unwrap();
    out
}
