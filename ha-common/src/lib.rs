//! Types and pure functions shared by the XDP program (`ha-ebpf`) and the
//! agent (`ha-user`).
//!
//! Every type here crosses the kernel boundary as raw bytes, so each one is
//! `#[repr(C)]`, has its padding spelled out as named fields (hash maps
//! compare keys byte by byte, and uninitialised padding would make two equal
//! keys differ), and has its size checked at compile time so that a change on
//! one side cannot silently disagree with the other.
//!
//! Byte order: addresses and ports in map keys and values are kept exactly as
//! they appear on the wire (network order), stored in native integers. The
//! data path then compares and copies packet fields without swapping, and the
//! agent converts with [`addr_to_wire`] / [`port_to_wire`].
#![no_std]

pub mod checksum;
pub mod hash;

/// Name of the XDP program inside the object file.
pub const XDP_PROGRAM_NAME: &str = "ha_xdp";
/// A program that passes everything: the benchmarks' floor and the lab's veth peer helper.
pub const XDP_PASS_PROGRAM_NAME: &str = "ha_xdp_pass";

// Map names, as declared in the XDP program.
pub const VIPS_MAP: &str = "VIPS";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const MAGLEV_MAP: &str = "MAGLEV";
pub const CONNTRACK_MAP: &str = "CONNTRACK";
pub const REVERSE_NAT_MAP: &str = "REVERSE_NAT";
pub const SETTINGS_MAP: &str = "SETTINGS";
pub const TX_PORTS_MAP: &str = "TX_PORTS";
pub const VERDICTS_MAP: &str = "VERDICTS";
pub const EVENTS_MAP: &str = "EVENTS";
pub const VIP_STATS_MAP: &str = "VIP_STATS";
pub const BACKEND_STATS_MAP: &str = "BACKEND_STATS";

/// Most VIPs one data plane serves; also the number of VIP stat slots.
pub const MAX_VIPS: u32 = 64;
/// Backend ids are indexes into an array of this size.
pub const MAX_BACKENDS: u32 = 4096;
/// Marks an empty Maglev slot (a VIP without backends).
pub const NO_BACKEND: u32 = u32::MAX;
/// Tries at finding a free NAT port before a new flow counts as exhausted.
pub const NAT_PORT_ATTEMPTS: u32 = 8;

/// `IPPROTO_TCP` / `IPPROTO_UDP`, the two protocols a VIP can carry.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An address as the data path stores it: the wire bytes in a native u32.
pub const fn addr_to_wire(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

pub const fn addr_from_wire(wire: u32) -> [u8; 4] {
    wire.to_ne_bytes()
}

/// A port as the data path stores it: the wire bytes in a native u16.
pub const fn port_to_wire(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

pub const fn port_from_wire(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

/// Key of the VIP table: what a client connects to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);

/// The VIP accepts traffic (an LB that is VRRP backup keeps the entry but clears this).
pub const VIP_FLAG_ENABLED: u32 = 1;

/// Value of the VIP table.
///
/// `table_offset` names the active half of this VIP's Maglev double buffer;
/// the agent fills the other half and then replaces this whole value, which
/// the kernel does atomically, so a packet sees either the old table or the
/// new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into VIP_STATS, and which region of MAGLEV belongs to this VIP.
    pub slot: u32,
    /// First MAGLEV index of the active table.
    pub table_offset: u32,
    /// The table size M (prime).
    pub table_size: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// The backend runs on this LB host: pass its packets up instead of NATing them.
pub const BACKEND_FLAG_LOCAL: u8 = 1;
/// The backend does not answer (refused, unreachable): its established flows
/// are broken anyway, so each moves to a live backend on its next packet.
pub const BACKEND_FLAG_DOWN: u8 = 2;

/// Value of the backend table (indexed by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    pub addr: u32,
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 8);

/// A flow as the client sent it: client -> VIP. Key of the connection table,
/// and value of the reverse NAT table (where replies find their client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// The client sent FIN.
pub const FLOW_FIN_CLIENT: u8 = 1;
/// The backend sent FIN.
pub const FLOW_FIN_BACKEND: u8 = 2;
/// The flow goes to a backend on this host: passed up, not NATed.
pub const FLOW_LOCAL: u8 = 4;

/// Value of the connection table: where a flow goes for its whole life.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    /// Source port on the LB's address towards the backend (wire order).
    pub nat_port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_coarse_ns` of the last packet (updated at most every [`LAST_SEEN_GRANULARITY_NS`]).
    pub last_seen_ns: u64,
    /// When the second FIN was seen; the entry ends `fin_linger` after it.
    pub closing_since_ns: u64,
    /// The source MAC of the flow's first packet: in one-arm, the next hop
    /// back to the client (the client, or its router). Replies use it when
    /// the kernel has no neighbour entry for the client, as on an LB that
    /// just took the VIP over and never exchanged a packet with it.
    pub client_mac: [u8; 6],
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Flow>() == 32);

impl Flow {
    /// Whether the entry has ended: `fin_linger` after both FINs, or idle
    /// longer than the protocol's timeout. One rule for the data path (on
    /// use) and the agent (sweeping), so they never disagree.
    #[inline(always)]
    pub fn is_expired(&self, protocol: u8, settings: &Settings, now_ns: u64) -> bool {
        let both_fins = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
        if self.flags & both_fins == both_fins
            && now_ns > self.closing_since_ns + settings.fin_linger_ns
        {
            return true;
        }
        let idle = if protocol == PROTO_TCP {
            settings.tcp_idle_timeout_ns
        } else {
            settings.udp_idle_timeout_ns
        };
        now_ns > self.last_seen_ns + idle + LAST_SEEN_GRANULARITY_NS
    }
}

/// `last_seen_ns` is refreshed only when it is older than this, so an
/// established flow does not write its entry on every packet.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Key of the reverse NAT table: a reply from a backend to the LB's NAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    pub backend_addr: u32,
    pub lb_addr: u32,
    pub backend_port: u16,
    pub nat_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<NatKey>() == 16);

impl NatKey {
    /// The reverse entry of a NATed flow to `backend`: what the backend's
    /// replies to `lb_addr:nat_port` look like.
    #[inline(always)]
    pub const fn new(backend: &BackendInfo, lb_addr: u32, nat_port: u16, protocol: u8) -> Self {
        NatKey {
            backend_addr: backend.addr,
            lb_addr,
            backend_port: backend.port,
            nat_port,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// Data-plane-wide settings, one entry in the SETTINGS array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The LB's own address: the source of NATed packets (wire order).
    pub lb_addr: u32,
    /// NAT source ports, host order, inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    pub tcp_idle_timeout_ns: u64,
    pub udp_idle_timeout_ns: u64,
    pub fin_linger_ns: u64,
    /// [`SETTINGS_FLAG_DEBUG`] and future switches.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 40);

/// Log new flows with aya-log (slow; for debugging only).
pub const SETTINGS_FLAG_DEBUG: u32 = 1;

/// Packets and bytes, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

impl Counter {
    /// Adds another CPU's slot (or another sample) to this one.
    pub fn merge(&mut self, other: &Counter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Traffic of one VIP or one backend, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounter {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounter>() == 24);

impl TrafficCounter {
    pub fn merge(&mut self, other: &TrafficCounter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
    }
}

macro_rules! indexed_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:literal => $label:literal,)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vmeta])* $variant = $value,)* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Short label for status output and metrics.
            pub const fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }
        }
    };
}

indexed_enum! {
    /// What happened to a packet: every packet counts in exactly one slot of
    /// VERDICTS. The numbering is the map index, so it never changes; new
    /// reasons are appended.
    pub enum Verdict {
        /// Not IPv4 (ARP, IPv6, ...): passed.
        PassNonIpv4 = 0 => "pass_non_ipv4",
        /// IPv4 TCP, not for a VIP or a NAT reply: passed.
        PassTcp = 1 => "pass_tcp",
        PassUdp = 2 => "pass_udp",
        PassIcmp = 3 => "pass_icmp",
        /// IPv4 with another protocol (VRRP, ...): passed.
        PassOtherIpv4 = 4 => "pass_other_ipv4",
        /// Shorter than its headers claim, or a bad IPv4 header length: passed untouched.
        PassMalformed = 5 => "pass_malformed",
        /// A client packet NATed to its backend and sent back out of the same interface.
        ForwardTx = 6 => "forward_tx",
        /// ... sent out of another interface through TX_PORTS.
        ForwardRedirect = 7 => "forward_redirect",
        /// A backend's reply translated back to VIP -> client and sent.
        ReplyTx = 8 => "reply_tx",
        ReplyRedirect = 9 => "reply_redirect",
        /// The flow's backend is this host: passed up for local delivery.
        PassLocalBackend = 10 => "pass_local_backend",
        /// A non-first IPv4 fragment (no ports to classify by): passed.
        PassFragment = 11 => "pass_fragment",
        /// A first fragment (MF set) to a VIP: dropped.
        DropVipFragment = 12 => "drop_vip_fragment",
        /// An IPv4 packet with options to a VIP: dropped.
        DropVipIpOptions = 13 => "drop_vip_ip_options",
        /// The VIP has no backend in its table: dropped.
        DropNoBackend = 14 => "drop_no_backend",
        /// No free NAT port after NAT_PORT_ATTEMPTS tries: dropped.
        DropNatExhausted = 15 => "drop_nat_exhausted",
        /// The next hop's MAC is not resolved yet: dropped (the client retransmits;
        /// the agent keeps backends' neighbours resolved).
        DropNoNeighbour = 16 => "drop_no_neighbour",
        /// No route to the backend, or another FIB failure: dropped.
        DropFibFailure = 17 => "drop_fib_failure",
        /// The route leaves through an interface not in TX_PORTS: dropped.
        DropNoTxPort = 18 => "drop_no_tx_port",
        /// The VIP is known but disabled (this LB is not its owner): passed.
        PassVipDisabled = 19 => "pass_vip_disabled",
        /// A flow's backend id points at no backend: dropped.
        DropStaleBackend = 20 => "drop_stale_backend",
    }
}

indexed_enum! {
    /// Slow-path events, counted per CPU in EVENTS (not per packet).
    pub enum Event {
        /// A new entry in the connection table.
        NewFlow = 0 => "new_flow",
        /// A TCP packet without SYN of an unknown flow took a backend from Maglev
        /// (an agent restart or an LB failover).
        MidstreamPickup = 1 => "midstream_pickup",
        /// A connection-table entry had timed out and was replaced.
        ExpiredFlowReplaced = 2 => "expired_flow_replaced",
        /// A NAT port candidate was taken and the next one was tried.
        NatPortCollision = 3 => "nat_port_collision",
        /// An entry ended on RST.
        FlowReset = 4 => "flow_reset",
        /// A reply whose connection-table entry was gone (reverse entry removed).
        ReplyOrphaned = 5 => "reply_orphaned",
        /// An established flow left a backend that is down for a live one.
        MovedFromDownBackend = 6 => "moved_from_down_backend",
        /// A reply went to the MAC the client's first packet came from (no
        /// neighbour entry for the client on this host).
        ReplyToLearnedMac = 7 => "reply_to_learned_mac",
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is repr(C), plain integers, with all padding as explicit
    // fields (sizes asserted above), so every byte pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for BackendInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for NatKey {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficCounter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_match_their_position() {
        for (position, verdict) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*verdict as usize, position, "{}", verdict.label());
        }
        for (position, event) in Event::ALL.iter().enumerate() {
            assert_eq!(*event as usize, position, "{}", event.label());
        }
    }

    #[test]
    fn wire_conversions_keep_packet_byte_order() {
        let addr = addr_to_wire([192, 168, 205, 254]);
        assert_eq!(addr.to_ne_bytes(), [192, 168, 205, 254]);
        assert_eq!(addr_from_wire(addr), [192, 168, 205, 254]);
        let port = port_to_wire(6443);
        assert_eq!(port.to_ne_bytes(), [0x19, 0x2b]);
        assert_eq!(port_from_wire(port), 6443);
    }

    #[test]
    fn flows_expire_after_idle_timeout_or_linger_after_both_fins() {
        let settings = Settings {
            tcp_idle_timeout_ns: 100 * LAST_SEEN_GRANULARITY_NS,
            udp_idle_timeout_ns: 10 * LAST_SEEN_GRANULARITY_NS,
            fin_linger_ns: 2 * LAST_SEEN_GRANULARITY_NS,
            ..Settings::default()
        };
        let g = LAST_SEEN_GRANULARITY_NS;
        let flow = Flow {
            last_seen_ns: 1000 * g,
            ..Flow::default()
        };
        assert!(!flow.is_expired(PROTO_TCP, &settings, 1100 * g));
        assert!(flow.is_expired(PROTO_TCP, &settings, 1102 * g));
        assert!(!flow.is_expired(PROTO_UDP, &settings, 1010 * g));
        assert!(flow.is_expired(PROTO_UDP, &settings, 1012 * g));
        let one_fin = Flow {
            flags: FLOW_FIN_CLIENT,
            closing_since_ns: 1000 * g,
            ..flow
        };
        assert!(!one_fin.is_expired(PROTO_TCP, &settings, 1005 * g));
        let both = Flow {
            flags: FLOW_FIN_CLIENT | FLOW_FIN_BACKEND,
            ..one_fin
        };
        assert!(!both.is_expired(PROTO_TCP, &settings, 1001 * g));
        assert!(both.is_expired(PROTO_TCP, &settings, 1003 * g));
    }

    #[test]
    fn merge_adds_every_field() {
        let mut total = Counter {
            packets: 1,
            bytes: 60,
        };
        total.merge(&Counter {
            packets: 2,
            bytes: 100,
        });
        assert_eq!(
            total,
            Counter {
                packets: 3,
                bytes: 160
            }
        );
        let mut traffic = TrafficCounter {
            packets: 1,
            bytes: 2,
            new_flows: 3,
        };
        traffic.merge(&traffic.clone());
        assert_eq!(
            traffic,
            TrafficCounter {
                packets: 2,
                bytes: 4,
                new_flows: 6
            }
        );
    }
}
