//! What a fuzz case is made of, and how proptest generates and shrinks it.
//!
//! A case is a sequence of steps: frames (client packets, backend replies,
//! other traffic, malformed and truncated variants), jumps of the virtual
//! clock between them, the agent's sweep, backend state changes and NAT
//! range changes (a reload). Steps are symbolic (pool indexes, "the k-th
//! flow in the table") and resolved against the world when they run, so a
//! shrunk case still means something and a fixture reads like a story.

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// One step of a case.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// The clock moves on by `advance_ns`, then `frame` goes through the data path.
    Frame { advance_ns: u64, frame: Frame },
    /// The clock moves on, then the agent sweeps both tables.
    Sweep { advance_ns: u64 },
    /// Backend `index` (of the pool the VIPs use) becomes up, draining or down.
    Backend { index: u8, state: BackendState },
    /// The current NAT range becomes range `index` of the pool (a reload):
    /// the previous one stays valid for its flows.
    NatRange { index: u8 },
    /// A whole handshake, each frame compared: the client's SYN from
    /// `client`:`port` to `target`, the backend's SYN+ACK to the flow's NAT
    /// port (if it got one), the client's ACK. Fills tables with
    /// established flows, which random frames rarely make.
    Handshake { client: u8, port: u8, target: u8 },
    /// One half of a flow is lost on both sides, as an LRU table or an
    /// agent killed in the middle of a sweep could lose it: the `index`-th
    /// entry (modulo the size) of the reverse table, or of the connection table.
    Lose { reverse: bool, index: u8 },
    /// The clock moves on, then `frame` leaves the host through the tc
    /// egress program (a local backend's reply, when it is a `ReplyOfFlow`
    /// of a local flow's reverse entry).
    Egress { advance_ns: u64, frame: Frame },
    /// The agent's confirming check passed: it clears the `index`-th
    /// (modulo their number) suspect backend's SUSPECT entry.
    Confirm { index: u8 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackendState {
    Up,
    Draining,
    Down,
}

/// A frame, before it is resolved against the world's pools.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub kind: Kind,
    /// The TCP flags byte (any of the 256); UDP ignores it.
    pub tcp_flags: u8,
    pub payload: u16,
    /// One 802.1Q tag.
    pub vlan: bool,
    pub mutation: Mutation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// From client `client` port `port` to `target` (indexes into the pools), TCP or UDP.
    Client {
        client: u8,
        port: u8,
        target: u8,
        udp: bool,
    },
    /// The next client packet of the `index`-th flow of the connection table (modulo its size).
    ClientOfFlow { index: u8 },
    /// From backend-side source `source` to address `dst` and NAT-side port `port`.
    Backend {
        source: u8,
        dst: u8,
        port: u8,
        udp: bool,
    },
    /// The backend's packet to the `index`-th reverse entry (modulo the table's size).
    ReplyOfFlow { index: u8 },
    /// Another protocol to a VIP: ICMP, a protocol number, or not IPv4 at all.
    Other { protocol: u8 },
    /// An ICMP message about the `index`-th flow (modulo the table's size): from the client's
    /// side about a packet the VIP sent it (from a router `source` of the client pool), or from
    /// the backend's side about a packet a NAT port sent (the `index`-th reverse entry). It
    /// quotes `quote` bytes of the packet's L4 header and payload (8 is the minimum an error
    /// carries; 20 a whole TCP header). `misaddressed`: to another address than the quoted
    /// packet's source.
    Icmp {
        index: u8,
        from_backend: bool,
        icmp_type: u8,
        code: u8,
        quote: u8,
        source: u8,
        misaddressed: bool,
        udp: bool,
    },
}

/// Damage done to the frame once it is built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mutation {
    None,
    /// Cut to this many bytes (at least 14: no driver delivers less).
    Truncate(u16),
    /// IPv4 options of this many 4-byte words.
    Options(u8),
    /// MF set: a first fragment.
    FirstFragment,
    /// A fragment offset: a later fragment.
    LaterFragment(u16),
    /// The IPv4 header-length nibble.
    Ihl(u8),
    /// The IPv4 version nibble.
    Version(u8),
    /// The IPv4 total length, plus this.
    TotalLength(i16),
    /// Bytes of Ethernet padding after the packet.
    Padding(u8),
    /// A wrong IPv4 header checksum (carried over, never repaired).
    BadIpChecksum,
    /// A wrong TCP/UDP checksum (carried over).
    BadL4Checksum,
    /// UDP without checksum.
    ZeroUdpChecksum,
    /// An 802.1ad outer tag instead of 802.1Q.
    QinQ,
    /// A byte of the first 64 XORed.
    Flip {
        offset: u8,
        xor: u8,
    },
    /// The IPv4 TTL (the header checksum kept right).
    Ttl(u8),
    /// DF cleared.
    NoDf,
}

/// Clock steps that matter: none, sub-granularity, around the 1 s refresh,
/// around each timeout (fin_linger 5 s, UDP 30/60 s, SYN 60 s, closing
/// 120 s, established 1 h), and far beyond.
const ADVANCES: [u64; 16] = [
    0,
    1_000_000,
    500_000_000,
    1_000_000_000,
    1_000_000_001,
    2_000_000_000,
    5_000_000_000,
    6_000_000_001,
    30_000_000_000,
    31_000_000_001,
    61_000_000_001,
    121_000_000_001,
    3_601_000_000_001,
    100_000_000_000_000,
    250_000_000,
    10_000_000_000,
];

fn advance() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => Just(0u64),
        6 => prop::sample::select(&ADVANCES[..]),
        1 => 0u64..200_000_000_000,
    ]
}

/// TCP flags: mostly what real TCP sends, sometimes anything.
fn tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(0x02u8),           // SYN
        6 => Just(0x10u8),           // ACK
        2 => Just(0x18u8),           // PSH|ACK
        2 => Just(0x12u8),           // SYN|ACK
        2 => Just(0x11u8),           // FIN|ACK
        1 => Just(0x04u8),           // RST
        1 => Just(0x14u8),           // RST|ACK
        3 => any::<u8>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        40 => Just(Mutation::None),
        2 => (14u16..80).prop_map(Mutation::Truncate),
        1 => (1u8..=10).prop_map(Mutation::Options),
        1 => Just(Mutation::FirstFragment),
        1 => (1u16..0x2000).prop_map(Mutation::LaterFragment),
        1 => (0u8..16).prop_map(Mutation::Ihl),
        1 => (0u8..16).prop_map(Mutation::Version),
        1 => (-40i16..40).prop_map(Mutation::TotalLength),
        1 => (1u8..=60).prop_map(Mutation::Padding),
        1 => Just(Mutation::BadIpChecksum),
        1 => Just(Mutation::BadL4Checksum),
        1 => Just(Mutation::ZeroUdpChecksum),
        1 => Just(Mutation::QinQ),
        1 => (any::<u8>(), 1u8..=255).prop_map(|(offset, xor)| Mutation::Flip { offset: offset % 64, xor }),
        2 => prop_oneof![Just(0u8), Just(1u8), Just(2u8), any::<u8>()].prop_map(Mutation::Ttl),
        1 => Just(Mutation::NoDf),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(client, port, target, udp)| Kind::Client { client, port, target, udp }),
        6 => any::<u8>().prop_map(|index| Kind::ClientOfFlow { index }),
        2 => (any::<u8>(), any::<u8>(), any::<u8>(), prop::bool::weighted(0.2))
            .prop_map(|(source, dst, port, udp)| Kind::Backend { source, dst, port, udp }),
        6 => any::<u8>().prop_map(|index| Kind::ReplyOfFlow { index }),
        1 => any::<u8>().prop_map(|protocol| Kind::Other { protocol }),
        4 => (
            any::<u8>(),
            any::<bool>(),
            prop_oneof![6 => Just(3u8), 2 => Just(11u8), 1 => Just(12u8), 1 => Just(0u8), 1 => Just(8u8), 1 => any::<u8>()],
            prop_oneof![3 => Just(4u8), 2 => Just(3u8), 1 => Just(0u8), 1 => 0u8..16],
            prop_oneof![4 => Just(8u8), 3 => Just(20u8), 2 => 0u8..64],
            any::<u8>(),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(index, from_backend, icmp_type, code, quote, source, misaddressed, udp)| Kind::Icmp {
                index, from_backend, icmp_type, code, quote, source, misaddressed, udp,
            }),
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        kind(),
        tcp_flags(),
        prop_oneof![8 => Just(0u16), 2 => 1u16..64, 1 => 1400u16..1600],
        prop::bool::weighted(0.05),
        mutation(),
    )
        .prop_map(|(kind, tcp_flags, payload, vlan, mutation)| Frame {
            kind,
            tcp_flags,
            payload,
            vlan,
            mutation,
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        40 => (advance(), frame()).prop_map(|(advance_ns, frame)| Step::Frame { advance_ns, frame }),
        2 => advance().prop_map(|advance_ns| Step::Sweep { advance_ns }),
        1 => (any::<u8>(), prop_oneof![Just(BackendState::Up), Just(BackendState::Draining), Just(BackendState::Down)])
            .prop_map(|(index, state)| Step::Backend { index, state }),
        1 => any::<u8>().prop_map(|index| Step::NatRange { index }),
        1 => any::<u8>().prop_map(|index| Step::Confirm { index }),
        1 => (any::<bool>(), any::<u8>()).prop_map(|(reverse, index)| Step::Lose { reverse, index }),
        6 => (advance(), frame(), any::<u8>(), prop::bool::weighted(0.7)).prop_map(|(advance_ns, mut frame, index, reply)| {
            if reply {
                frame.kind = Kind::ReplyOfFlow { index };
            }
            Step::Egress { advance_ns, frame }
        }),
        6 => (any::<u8>(), any::<u16>(), prop_oneof![4 => Just(0u8), 2 => Just(2u8), 2 => any::<u8>()])
            .prop_map(|(client, port, target)| Step::Handshake { client, port: port as u8 ^ (port >> 8) as u8, target }),
    ]
}

/// A case: 1 to 64 steps.
pub fn case() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 1..=64)
}
