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
/// Name of the tc egress program (the replies of local backends, back to their VIP).
pub const TC_EGRESS_PROGRAM_NAME: &str = "ha_tc_egress";

// Map names, as declared in the XDP program.
pub const VIPS_MAP: &str = "VIPS";
pub const BACKENDS_MAP: &str = "BACKENDS";
pub const MAGLEV_MAP: &str = "MAGLEV";
pub const CONNTRACK_MAP: &str = "CONNTRACK";
pub const REVERSE_NAT_MAP: &str = "REVERSE_NAT";
pub const SETTINGS_MAP: &str = "SETTINGS";
pub const SETTINGS_ACTIVE_MAP: &str = "SETTINGS_ACTIVE";
pub const TX_PORTS_MAP: &str = "TX_PORTS";
pub const VERDICTS_MAP: &str = "VERDICTS";
pub const EVENTS_MAP: &str = "EVENTS";
pub const VIP_STATS_MAP: &str = "VIP_STATS";
pub const BACKEND_STATS_MAP: &str = "BACKEND_STATS";
pub const BACKEND_INDEX_MAP: &str = "BACKEND_INDEX";
pub const EMBRYONIC_MAP: &str = "EMBRYONIC";
pub const EMBRYONIC_HEAD_MAP: &str = "EMBRYONIC_HEAD";
/// Passive health (docs/data-path.md, "Passive health"): `Array<u64>`,
/// [`MAX_BACKENDS`] entries indexed by backend id. The clock
/// (`bpf_ktime_get_coarse_ns`, as `Flow::last_seen_ns`) at which the data
/// path saw the backend refuse a flow's SYN (RST, or ICMP unreachable); 0
/// when not suspect. The data path sets it; the agent clears it (writes 0)
/// once its confirming check passes. Selection skips a backend suspected
/// less than [`SUSPECT_TTL_NS`] ago.
pub const SUSPECT_MAP: &str = "SUSPECT";
/// Passive health events to the agent: a `BPF_MAP_TYPE_RINGBUF` of
/// [`PassiveEvent`] records, one when a backend becomes suspect.
pub const PASSIVE_EVENTS_MAP: &str = "PASSIVE_EVENTS";
/// Bytes of the PASSIVE_EVENTS ring (a power of two, a multiple of the page size).
pub const PASSIVE_EVENTS_BYTES: u32 = 64 * 1024;
/// How long a suspect flag keeps a backend out of selection without the
/// agent's word: the agent confirms within a check's timeout, so this only
/// bounds what a missing or stuck agent costs (the backend is then tried
/// again, and suspected again if it still refuses).
pub const SUSPECT_TTL_NS: u64 = 5_000_000_000;

/// Why the data path suspected a backend ([`PassiveEvent::reason`]).
pub const PASSIVE_REASON_RST_TO_SYN: u32 = 1;
/// An ICMP destination unreachable about a packet the LB sent the backend.
pub const PASSIVE_REASON_ICMP_UNREACHABLE: u32 = 2;
/// L4 redispatch (docs/data-path.md, "Passive health"): `LruHashMap<FlowKey,
/// u64>`, the clock at which a flow's SYN was refused and its RST dropped,
/// so the client's retransmitted SYN went to another backend. A flow key
/// found here less than [`REDISPATCH_WINDOW_NS`] ago is not redispatched
/// again: its next refusal reaches the client.
pub const REDISPATCHED_MAP: &str = "REDISPATCHED";
/// Entries of REDISPATCHED (LRU: the oldest are pushed out first).
pub const REDISPATCHED_ENTRIES: u32 = 16_384;
/// How long a redispatched flow key stays redispatched: longer than the
/// client's first SYN retransmission (1 s on Linux, 3 s on older stacks),
/// short enough that a connection opened later from the same port is
/// redispatched again.
pub const REDISPATCH_WINDOW_NS: u64 = 5_000_000_000;
/// Other Maglev slots a new flow tries, each derived from its hash with
/// another seed ([`hash::rehash`]), when its own slot's backend is suspect.
/// Each lands on the suspect backend again with the odds of its share of
/// the table: with one of three backends suspect, 4 attempts left 1 in 81
/// of its new flows on it (seen as a fuzz fixture failing by the lab's
/// addresses), 16 leave 1 in 43 million. The loop runs only for a suspect
/// slot's flows.
pub const SUSPECT_REHASHES: u32 = 16;

/// Whether a SUSPECT entry `at_ns` (0: none) still holds at `now_ns`: set,
/// and less than [`SUSPECT_TTL_NS`] ago (an entry from the future holds).
#[inline(always)]
pub const fn suspect_holds(at_ns: u64, now_ns: u64) -> bool {
    at_ns != 0 && now_ns < at_ns.saturating_add(SUSPECT_TTL_NS)
}
pub const SOCK_LB_NETNS_MAP: &str = "SOCK_LB_NETNS";
pub const SOCK_LB_REVERSE_MAP: &str = "SOCK_LB_REVERSE";
pub const SOCK_LB_EVENTS_MAP: &str = "SOCK_LB_EVENTS";

/// The socket-level balancer's programs (docs/data-path.md, "Socket-level
/// balancing"): cgroup/connect4, cgroup/sendmsg4, cgroup/getpeername4 and
/// cgroup/recvmsg4, in the same object as the XDP program so they read its
/// VIPS, MAGLEV and BACKENDS maps.
pub const SOCK_CONNECT4_PROGRAM_NAME: &str = "ha_sock_connect4";
pub const SOCK_SENDMSG4_PROGRAM_NAME: &str = "ha_sock_sendmsg4";
pub const SOCK_GETPEERNAME4_PROGRAM_NAME: &str = "ha_sock_getpeername4";
pub const SOCK_RECVMSG4_PROGRAM_NAME: &str = "ha_sock_recvmsg4";

/// Entries of SOCK_LB_REVERSE (LRU): sockets balanced at once whose peer
/// is reported as the VIP.
pub const SOCK_LB_REVERSE_ENTRIES: u32 = 65_536;
pub const EGRESS_VERDICTS_MAP: &str = "EGRESS_VERDICTS";

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

/// The backend runs on this LB host: its flows are delivered up, translated
/// to the backend's address and port (docs/data-path.md, "Local backends").
pub const BACKEND_FLAG_LOCAL: u8 = 1;
/// The backend does not answer (refused, unreachable): its established flows
/// are broken anyway, so each moves to a live backend on its next packet.
pub const BACKEND_FLAG_DOWN: u8 = 2;

/// A record of the PASSIVE_EVENTS ring buffer: the data path suspected a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveEvent {
    pub backend_id: u32,
    /// `PASSIVE_REASON_*`.
    pub reason: u32,
    /// The clock at which it was suspected (as the SUSPECT entry).
    pub at_ns: u64,
}
const _: () = assert!(core::mem::size_of::<PassiveEvent>() == 16);

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
/// and part of the reverse NAT table's value (where replies find their client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    /// Equality without a branch per field (the BPF verifier walks every
    /// branch; the derived `==` has five).
    #[inline(always)]
    pub fn same(&self, other: &FlowKey) -> bool {
        let words = |k: &FlowKey| -> [u64; 2] {
            // SAFETY: FlowKey is 16 bytes of plain integers with explicit padding.
            unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*k) }
        };
        let (a, b) = (words(self), words(other));
        (a[0] ^ b[0]) | (a[1] ^ b[1]) == 0
    }

    /// The all-zero key marks a slot of a queue of recent flows never written (a real
    /// key never has destination 0: it is a VIP).
    pub const EMPTY: FlowKey = FlowKey {
        src_addr: 0,
        dst_addr: 0,
        src_port: 0,
        dst_port: 0,
        protocol: 0,
        _pad: [0; 3],
    };
}

// Flow flag bits (docs/data-path.md, "The flow state machine"). Bits are only
// ever set, atomically; a flow that must start over is removed and created anew.
/// The backend sent a packet that is not an RST (a local backend's: seen by the tc egress program).
pub const FLOW_SEEN_REPLY: u32 = 1;
/// The client sent a packet that is not a bare SYN after the reply: established.
pub const FLOW_ASSURED: u32 = 2;
/// The client sent FIN.
pub const FLOW_FIN_CLIENT: u32 = 4;
/// The backend sent FIN.
pub const FLOW_FIN_BACKEND: u32 = 8;
/// Either side sent RST.
pub const FLOW_RESET: u32 = 16;
/// The flow goes to a backend on this host: its destination translated, passed up.
pub const FLOW_LOCAL: u32 = 32;

/// A flow's state, derived from its flag bits (first rule that matches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// RST, or FIN from both sides; ends `fin_linger` after its last packet.
    Closed,
    /// The client's first packet and nothing from the backend yet (TCP SYN_SENT).
    New,
    /// The backend answered, the client has not confirmed (TCP SYN_RECV).
    Replied,
    /// Established, and one side sent FIN.
    Closing,
    /// Answered by the backend and confirmed by the client (conntrack's ASSURED).
    Established,
}

impl FlowState {
    pub const fn label(self) -> &'static str {
        match self {
            FlowState::Closed => "closed",
            FlowState::New => "new",
            FlowState::Replied => "replied",
            FlowState::Closing => "closing",
            FlowState::Established => "established",
        }
    }
}

/// Value of the connection table: where a flow goes for its whole life.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    /// `FLOW_*` bits, set with atomic OR.
    pub flags: u32,
    /// The clock (`bpf_ktime_get_coarse_ns`) at the flow's last packet,
    /// refreshed at most every [`LAST_SEEN_GRANULARITY_NS`] unless the state changed.
    pub last_seen_ns: u64,
    /// NAT source address towards the backend (wire order); a local flow's
    /// client address (the source its packets keep), or 0 for a local flow
    /// created by a program that did not translate them.
    pub nat_addr: u32,
    /// NAT source port towards the backend (wire order); a local flow's
    /// client port (0 as above).
    pub nat_port: u16,
    /// The source MAC of the flow's first packet: in one-arm, the next hop
    /// back to the client (the client, or its router). Replies use it when
    /// the kernel has no neighbour entry for the client, as on an LB that
    /// just took the VIP over and never exchanged a packet with it. Zero when
    /// the entry was rebuilt from the reverse table.
    pub client_mac: [u8; 6],
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Flow>() == 32);

impl Flow {
    /// The state its bits say (docs/data-path.md).
    #[inline(always)]
    pub const fn state(&self) -> FlowState {
        let f = self.flags;
        let both_fins = FLOW_FIN_CLIENT | FLOW_FIN_BACKEND;
        if f & FLOW_RESET != 0 || f & both_fins == both_fins {
            FlowState::Closed
        } else if f & FLOW_ASSURED == 0 {
            if f & FLOW_SEEN_REPLY == 0 {
                FlowState::New
            } else {
                FlowState::Replied
            }
        } else if f & both_fins != 0 {
            FlowState::Closing
        } else {
            FlowState::Established
        }
    }

    /// May be evicted to make room: not established (embryonic, or a closed
    /// flow lingering). An established or closing flow never is, local or
    /// NATed: a local backend's answers are seen by the tc egress program, so
    /// a local flow is assured by both sides as a NATed one is.
    ///
    /// Computed without a branch (as is [`Flow::timeout_class`]): the BPF
    /// verifier keeps apart every path that tested a different bit of the
    /// flags, and these run in loops.
    #[inline(always)]
    pub const fn is_evictable(&self) -> bool {
        let f = self.flags;
        let assured = (f >> 1) & 1;
        let closed = ((f >> 4) & 1) | ((f >> 2) & (f >> 3) & 1);
        (closed | (assured ^ 1)) != 0
    }

    /// Which of `Settings::timeouts_ns` applies to the flow now (a `TIMEOUT_*` index).
    #[inline(always)]
    pub const fn timeout_class(&self, protocol: u8) -> usize {
        // Bit positions of FLOW_ASSURED (1), FLOW_FIN_CLIENT (2),
        // FLOW_FIN_BACKEND (3) and FLOW_RESET (4).
        let f = self.flags as usize;
        let assured = (f >> 1) & 1;
        let fin_client = (f >> 2) & 1;
        let fin_backend = (f >> 3) & 1;
        let closed = ((f >> 4) & 1) | (fin_client & fin_backend);
        let any_fin = fin_client | fin_backend;
        // TCP: closed 3, else not assured 0, else closing 2, else established 1.
        let tcp = closed * TIMEOUT_TCP_CLOSED
            + (closed ^ 1) * assured * (TIMEOUT_TCP_ESTABLISHED + any_fin);
        let udp = TIMEOUT_UDP_UNREPLIED + assured;
        // TCP is 6 (bit 4 clear), UDP 17 (bit 4 set).
        let is_udp = ((protocol >> 4) & 1) as usize;
        (tcp * (is_udp ^ 1) + udp * is_udp) & (TIMEOUTS - 1)
    }

    /// How long the flow may stay without a packet, in its current state.
    #[inline(always)]
    pub const fn timeout_ns(&self, protocol: u8, settings: &Settings) -> u64 {
        settings.timeouts_ns[self.timeout_class(protocol)]
    }

    /// Whether the entry has ended: no packet for longer than its state's
    /// timeout (plus the refresh granularity). One rule for the data path (on
    /// use) and the agent (sweeping), so they never disagree.
    #[inline(always)]
    pub const fn is_expired(&self, protocol: u8, settings: &Settings, now_ns: u64) -> bool {
        let deadline = self
            .last_seen_ns
            .saturating_add(self.timeout_ns(protocol, settings))
            .saturating_add(LAST_SEEN_GRANULARITY_NS);
        now_ns > deadline
    }

    /// Whether the flow has a reverse entry to keep: a NATed flow, or a
    /// local flow that translates (its NAT source is its client `key`'s own
    /// address and port; a local flow left by a program that passed them
    /// untranslated has 0:0 there, and no reverse entry).
    #[inline(always)]
    pub const fn has_reverse(&self, key: &FlowKey) -> bool {
        let local = (self.flags >> 5) & 1;
        let other = (self.nat_addr ^ key.src_addr) | ((self.nat_port ^ key.src_port) as u32);
        local == 0 || other == 0
    }

    /// Whether this flow is the one a reverse entry `(nat_addr, nat_port)`
    /// with `backend_id` belongs to. A local flow names its reverse entry
    /// too (its client's address and port stand for the NAT source); the
    /// paths that translate only NATed flows check `FLOW_LOCAL` apart.
    #[inline(always)]
    pub const fn names(&self, nat_addr: u32, nat_port: u16, backend_id: u32) -> bool {
        // One comparison, not three branches (the BPF verifier walks each).
        ((self.nat_addr ^ nat_addr)
            | ((self.nat_port ^ nat_port) as u32)
            | (self.backend_id ^ backend_id))
            == 0
    }
}

/// `last_seen_ns` is refreshed only when it is older than this, so an
/// established flow does not write its entry on every packet.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// A reverse entry whose flow is missing is taken as an orphan only when it
/// is older than this: a younger one may belong to a flow that another CPU
/// is creating (reverse entry first, then the flow).
pub const ORPHAN_GRACE_NS: u64 = 1_000_000_000;

/// Key of the reverse NAT table: a reply from a backend to the LB's NAT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// Value of the reverse NAT table: the client flow a NAT port belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub flow: FlowKey,
    /// The flow's backend, so a lost connection-table entry can be rebuilt.
    pub backend_id: u32,
    pub _pad: u32,
    /// When the port was claimed (same clock as `Flow::last_seen_ns`).
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 32);

/// The state of a CPU's queue of recently created flows (EMBRYONIC_HEAD):
/// the slot the next record goes to, and how many records it holds (the
/// oldest is `len` slots before `next`, wrapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueHead {
    pub next: u32,
    pub len: u32,
}
const _: () = assert!(core::mem::size_of::<QueueHead>() == 8);

/// How many records of the queue a full table looks at, oldest first, for a
/// flow to evict before it gives up (`drop_table_full`).
pub const MAKE_ROOM_ATTEMPTS: u32 = 8;

/// Key of the backend index: a backend's address and port (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<BackendAddr>() == 8);

/// A NAT source: address (wire order) and ports (host order, inclusive).
/// `addr` 0 marks an unused entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatRange {
    pub addr: u32,
    pub port_min: u16,
    pub port_max: u16,
}
const _: () = assert!(core::mem::size_of::<NatRange>() == 8);

impl NatRange {
    /// Whether `addr:port` (wire order) falls in this range.
    #[inline(always)]
    pub const fn contains(&self, addr: u32, port: u16) -> bool {
        let port = port_from_wire(port);
        self.addr != 0 && self.addr == addr && port >= self.port_min && port <= self.port_max
    }
}

/// How many NAT ranges are live at once: the current one and earlier ones
/// that still have flows.
pub const NAT_RANGES: usize = 4;

/// Data-plane-wide settings, one entry in the SETTINGS array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `nat[0]`: the source of new flows; `nat[1..]`: earlier sources whose
    /// flows still live (replies to them are still translated).
    pub nat: [NatRange; NAT_RANGES],
    /// How long a flow may stay without a packet, by protocol and state:
    /// indexed by the `TIMEOUT_*` constants (as Linux conntrack's per-state
    /// timeout tables); the last two slots are unused.
    pub timeouts_ns: [u64; TIMEOUTS],
    /// 0: packets see the kernel's clock. Otherwise every packet sees this
    /// time: a virtual clock for BPF_PROG_TEST_RUN (fixtures, the fuzzer).
    pub clock_ns: u64,
    /// Slots of each CPU's queue of recently created flows (EMBRYONIC),
    /// where room is made when the connection table is full.
    pub embryonic_slots: u32,
    /// [`SETTINGS_FLAG_DEBUG`] and future switches.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 112);

/// The timeout of each flow state, by name; [`Timeouts::table`] gives
/// `Settings::timeouts_ns`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP not established (SYN_SENT, SYN_RECV).
    pub tcp_syn_ns: u64,
    pub tcp_established_ns: u64,
    /// TCP established, one side sent FIN.
    pub tcp_closing_ns: u64,
    /// TCP after RST or FIN from both sides (`fin_linger`).
    pub tcp_closed_ns: u64,
    pub udp_unreplied_ns: u64,
    pub udp_established_ns: u64,
}

impl Timeouts {
    /// The table the data path indexes by state (unused slots: the UDP established timeout).
    pub const fn table(&self) -> [u64; TIMEOUTS] {
        let mut table = [self.udp_established_ns; TIMEOUTS];
        table[TIMEOUT_TCP_EMBRYONIC] = self.tcp_syn_ns;
        table[TIMEOUT_TCP_ESTABLISHED] = self.tcp_established_ns;
        table[TIMEOUT_TCP_CLOSING] = self.tcp_closing_ns;
        table[TIMEOUT_TCP_CLOSED] = self.tcp_closed_ns;
        table[TIMEOUT_UDP_UNREPLIED] = self.udp_unreplied_ns;
        table[TIMEOUT_UDP_ESTABLISHED] = self.udp_established_ns;
        table
    }
}

/// Slots of `Settings::timeouts_ns`.
pub const TIMEOUTS: usize = 8;
/// TCP, not established (SYN_SENT, SYN_RECV): `tcp_syn_timeout`.
pub const TIMEOUT_TCP_EMBRYONIC: usize = 0;
/// TCP, established: `tcp_idle_timeout`.
pub const TIMEOUT_TCP_ESTABLISHED: usize = 1;
/// TCP, established and one side sent FIN: `tcp_closing_timeout`.
pub const TIMEOUT_TCP_CLOSING: usize = 2;
/// TCP, closed (RST, or FIN from both sides): `fin_linger`.
pub const TIMEOUT_TCP_CLOSED: usize = 3;
/// UDP, not established: `udp_unreplied_timeout`.
pub const TIMEOUT_UDP_UNREPLIED: usize = 4;
/// UDP, established: `udp_idle_timeout`.
pub const TIMEOUT_UDP_ESTABLISHED: usize = 5;

/// Log new flows with aya-log (slow; for debugging only).
pub const SETTINGS_FLAG_DEBUG: u32 = 1;

impl Settings {
    /// Whether `addr:port` (wire order) is a live NAT port: the current or an earlier range.
    #[inline(always)]
    pub const fn is_nat_port(&self, addr: u32, port: u16) -> bool {
        self.nat[0].contains(addr, port)
            || self.nat[1].contains(addr, port)
            || self.nat[2].contains(addr, port)
            || self.nat[3].contains(addr, port)
    }
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

/// Linux conntrack's `tcp_valid_flags`: the combinations of FIN, SYN, RST,
/// ACK and URG a real TCP sends (PSH, ECE and CWR do not matter). Bit `i` is
/// set when `flags & 0x37 == i` is valid.
const TCP_VALID_FLAGS: u64 = (1 << TCP_SYN)
    | (1 << (TCP_SYN | TCP_URG))
    | (1 << (TCP_SYN | TCP_ACK))
    | (1 << TCP_RST)
    | (1 << (TCP_RST | TCP_ACK))
    | (1 << (TCP_FIN | TCP_ACK))
    | (1 << (TCP_FIN | TCP_ACK | TCP_URG))
    | (1 << TCP_ACK)
    | (1 << (TCP_ACK | TCP_URG));

/// Whether a TCP header's flags byte is a combination a real TCP sends.
#[inline(always)]
pub const fn tcp_flags_valid(flags: u8) -> bool {
    let relevant = flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG);
    (TCP_VALID_FLAGS >> relevant) & 1 == 1
}

/// The flag bits a client packet adds to a flow that has `current`
/// (docs/data-path.md, "Which packet does what to a flow"). `first`: the
/// packet creates the flow, which it can never mark answered.
///
/// Arithmetic on the bits rather than a branch per flag: the BPF verifier
/// would otherwise walk what follows once per combination of flags.
#[inline(always)]
pub const fn client_packet_bits(current: u32, tcp_flags: u8, first: bool) -> u32 {
    let f = tcp_flags as u32;
    let fin = f & 1;
    let syn = (f >> 1) & 1;
    let rst = (f >> 2) & 1;
    let ack = (f >> 4) & 1;
    let bare_syn = syn & (ack ^ 1) & (rst ^ 1);
    let advances = (bare_syn ^ 1) & (first as u32 ^ 1);
    // A local flow too: its backend's answers are seen by the tc egress program.
    let answered = (current & FLOW_SEEN_REPLY) * FLOW_ASSURED;
    let otherwise = fin * FLOW_FIN_CLIENT + advances * answered;
    rst * FLOW_RESET + (rst ^ 1) * otherwise
}

/// The flag bits a backend's packet adds to its flow (branch-free, as above).
#[inline(always)]
pub const fn backend_packet_bits(tcp_flags: u8) -> u32 {
    let f = tcp_flags as u32;
    let rst = (f >> 2) & 1;
    let fin = f & 1;
    rst * FLOW_RESET + (rst ^ 1) * (FLOW_SEEN_REPLY + fin * FLOW_FIN_BACKEND)
}

/// The bits that make a client's bare SYN start the flow afresh instead of
/// continuing it: the old connection was answered and confirmed, or is ending.
pub const FLOW_RESTART_ON_SYN: u32 = FLOW_ASSURED | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND | FLOW_RESET;

/// SYN without ACK or RST: a client opening a connection.
#[inline(always)]
pub const fn tcp_bare_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
}

/// Key of SOCK_LB_REVERSE: a socket (its cookie, `bpf_get_socket_cookie`)
/// and the backend the socket-level balancer sent it to (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockBackendKey {
    pub cookie: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockBackendKey>() == 16);

/// Value of SOCK_LB_REVERSE: the VIP the socket asked for (wire order),
/// reported by getpeername() and as the source of received datagrams.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockVip {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockVip>() == 8);

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

            /// The variant numbered `index`; the first one if there is none.
            #[inline(always)]
            pub const fn from_index(index: u32) -> $name {
                let all = Self::ALL;
                if (index as usize) < all.len() { all[index as usize] } else { all[0] }
            }

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
        /// A first fragment (MF set) to a VIP or a NAT port: dropped.
        DropVipFragment = 12 => "drop_vip_fragment",
        /// An IPv4 packet with options to a VIP or a NAT port: dropped.
        DropVipIpOptions = 13 => "drop_vip_ip_options",
        /// The VIP has no backend in its table: dropped.
        DropNoBackend = 14 => "drop_no_backend",
        /// No free NAT port after NAT_PORT_ATTEMPTS tries: dropped.
        DropNatExhausted = 15 => "drop_nat_exhausted",
        /// The next hop's MAC is not resolved yet: dropped (the client retransmits;
        /// the agent keeps backends' neighbours resolved).
        DropNoNeighbour = 16 => "drop_no_neighbour",
        /// A FIB answer without a verdict of its own (an unsupported lightweight
        /// tunnel, no source address): dropped.
        DropFibFailure = 17 => "drop_fib_failure",
        /// The route leaves through an interface not in TX_PORTS: dropped.
        DropNoTxPort = 18 => "drop_no_tx_port",
        /// The VIP is known but disabled (this LB is not its owner): passed.
        PassVipDisabled = 19 => "pass_vip_disabled",
        /// A flow's backend id points at no backend: dropped.
        DropStaleBackend = 20 => "drop_stale_backend",
        /// A backend's packet to a live NAT port that no flow owns: dropped,
        /// so the host's own stack never answers it with an RST.
        DropReplyNoFlow = 21 => "drop_reply_no_flow",
        /// The connection table is full and no entry could be evicted: dropped.
        DropTableFull = 22 => "drop_table_full",
        /// TCP flags no real TCP sends together (SYN+FIN, none, ...): dropped.
        DropInvalidTcpFlags = 23 => "drop_invalid_tcp_flags",
        /// An ICMP error about a client's flow (from the client's side, about a
        /// packet the VIP sent) translated to the flow's backend (RFC 5508) and sent.
        IcmpForwardTx = 24 => "icmp_forward_tx",
        IcmpForwardRedirect = 25 => "icmp_forward_redirect",
        /// An ICMP error from the backend's side about a packet sent from a NAT
        /// port, translated back to the flow's client and sent.
        IcmpReplyTx = 26 => "icmp_reply_tx",
        IcmpReplyRedirect = 27 => "icmp_reply_redirect",
        /// A packet to forward arrived with TTL 0 or 1: answered with ICMP time
        /// exceeded (from the address it was sent to) instead.
        IcmpTimeExceededTx = 28 => "icmp_time_exceeded_tx",
        /// A packet with DF set is larger than the route's MTU: answered with ICMP
        /// fragmentation needed carrying that MTU instead.
        IcmpFragNeededTx = 29 => "icmp_frag_needed_tx",
        /// Larger than the route's MTU and not to be answered (no DF, or itself an
        /// ICMP error): dropped.
        DropFragNeeded = 30 => "drop_frag_needed",
        /// An ICMP error to translate whose TTL ran out: dropped (no error about an error).
        DropTtlExceeded = 31 => "drop_ttl_exceeded",
        /// The FIB has no route to the destination, or it is local or broadcast: dropped.
        DropNoRoute = 32 => "drop_no_route",
        /// The route is a blackhole: dropped.
        DropRouteBlackhole = 33 => "drop_route_blackhole",
        /// The route is unreachable: dropped.
        DropRouteUnreachable = 34 => "drop_route_unreachable",
        /// The route is prohibit: dropped.
        DropRouteProhibit = 35 => "drop_route_prohibit",
        /// IPv4 forwarding is off on the interface the frame came in on: dropped.
        DropForwardingDisabled = 36 => "drop_forwarding_disabled",
        /// A backend's RST to a flow's SYN (the flow still new), while another
        /// backend is eligible: dropped, the flow forgotten, so the client's
        /// retransmitted SYN is balanced again, away from the now suspect
        /// backend (L4 redispatch, at most once per flow key and window).
        DropRedispatched = 37 => "drop_redispatched",
    }
}

indexed_enum! {
    /// Slow-path events, counted per CPU in EVENTS (not per packet).
    pub enum Event {
        /// A new entry in the connection table.
        NewFlow = 0 => "new_flow",
        /// A TCP flow whose first packet was not a bare SYN took a backend
        /// from Maglev (an agent restart or an LB failover).
        MidstreamPickup = 1 => "midstream_pickup",
        /// An ended (expired) entry was found in use and removed.
        ExpiredFlowReplaced = 2 => "expired_flow_replaced",
        /// A NAT port candidate was taken and the next one was tried.
        NatPortCollision = 3 => "nat_port_collision",
        /// A flow was closed by RST.
        FlowReset = 4 => "flow_reset",
        /// A lost connection-table entry was rebuilt from its reverse entry
        /// (by a reply, or by the client's packet finding its own NAT port).
        ForwardRecovered = 5 => "forward_recovered",
        /// An established flow left a backend that is down for a live one.
        MovedFromDownBackend = 6 => "moved_from_down_backend",
        /// A reply went to the MAC the client's first packet came from (no
        /// neighbour entry for the client on this host).
        ReplyToLearnedMac = 7 => "reply_to_learned_mac",
        /// A flow that was not established (never answered and confirmed, or
        /// closed) was removed to make room for a new one: in a full table,
        /// or for a NAT port.
        EmbryonicEvicted = 8 => "embryonic_evicted",
        /// A reverse entry whose flow was gone was taken over by a new flow.
        OrphanFreed = 9 => "orphan_freed",
        /// A lost reverse entry was rebuilt from its connection-table entry.
        ReverseRecovered = 10 => "reverse_recovered",
        /// A client's bare SYN on an established, closing or closed entry
        /// started a fresh flow (re-hashed, new state).
        SynRestartedFlow = 11 => "syn_restarted_flow",
        /// A backend became suspect (passive health): it refused a new
        /// flow's SYN with RST, or an ICMP destination unreachable came back
        /// about a packet sent to it for a new flow, while not suspect.
        BackendSuspected = 12 => "backend_suspected",
        /// The PASSIVE_EVENTS ring was full: a backend became suspect but the
        /// agent was not told (it learns by its own checks instead).
        PassiveEventLost = 13 => "passive_event_lost",
        /// A new flow whose Maglev slot names a suspect backend went to
        /// another backend (a rehashed slot).
        SuspectSkipped = 14 => "suspect_skipped",
        /// A new flow went to a suspect backend: every rehashed slot was
        /// suspect or empty too (fail open).
        SuspectFailOpen = 15 => "suspect_fail_open",
        /// A backend's RST to a flow's SYN was dropped and the flow forgotten,
        /// for the client's retransmission to go elsewhere (`drop_redispatched`).
        Redispatched = 16 => "redispatched",
        /// A backend's RST to a flow's SYN reached the client: the flow key
        /// was redispatched less than REDISPATCH_WINDOW_NS ago.
        RedispatchLimit = 17 => "redispatch_limit",
        /// A backend's RST to a flow's SYN reached the client: no other
        /// backend was eligible (the rest suspect or none), so the client
        /// fails fast rather than after its retransmissions.
        RedispatchNoAlternative = 18 => "redispatch_no_alternative",
    }
}

indexed_enum! {
    /// What the socket-level balancer did, counted per CPU in SOCK_LB_EVENTS
    /// (one slot per call it acted on or left alone for a reason).
    pub enum SockLbEvent {
        /// A connect() to a VIP was sent to a backend.
        ConnectBalanced = 0 => "connect_balanced",
        /// A sendmsg() of an unconnected UDP socket to a VIP was sent to a backend.
        SendmsgBalanced = 1 => "sendmsg_balanced",
        /// The VIP's Maglev table is empty where the socket's hash falls: the
        /// call was left as it was (to the VIP itself).
        NoBackend = 2 => "no_backend",
        /// The VIP is disabled here (a VRRP backup): left as it was, so the
        /// connection goes to the VIP's holder.
        VipDisabled = 3 => "vip_disabled",
        /// A call to a VIP from a socket of another network namespace than
        /// the agent's: left as it was.
        OtherNetns = 4 => "other_netns",
        /// getpeername() of a balanced socket reported its VIP.
        PeerRestored = 5 => "peer_restored",
        /// A datagram from a balanced socket's backend was reported as from the VIP.
        SourceRestored = 6 => "source_restored",
        /// The socket's VIP could not be recorded (SOCK_LB_REVERSE refused
        /// the entry): getpeername() reports the backend.
        ReverseNotRecorded = 7 => "reverse_not_recorded",
    }
}

indexed_enum! {
    /// What the tc egress program did with a packet leaving the interface:
    /// every packet counts in exactly one slot of EGRESS_VERDICTS. It never
    /// drops: each one leaves, translated or untouched.
    pub enum EgressVerdict {
        /// Not a local backend's reply (not TCP or UDP over IPv4, or no
        /// reverse entry for its tuple): untouched.
        Pass = 0 => "egress_pass",
        /// Shorter than its headers claim, or a bad IPv4 header: untouched.
        PassMalformed = 1 => "egress_pass_malformed",
        /// A fragment (its later fragments have no ports to translate by): untouched.
        PassFragment = 2 => "egress_pass_fragment",
        /// A reverse entry matched, but its flow is missing, not local, does
        /// not name the entry, or has expired (then forgotten): untouched.
        PassNoFlow = 3 => "egress_pass_no_flow",
        /// A local backend's reply: its source rewritten to the flow's VIP and port.
        Translated = 4 => "egress_translated",
        /// A local backend refused a new flow's SYN (RST+ACK) and the client's
        /// retransmission would go to another backend: passive health's L4
        /// redispatch, as on the reply path. The RST is dropped (`TC_ACT_SHOT`,
        /// the one packet the egress program drops) and the flow forgotten.
        Redispatched = 5 => "egress_redispatched",
    }
}

/// The least TCP and UDP header a packet must carry to have ports (and TCP flags).
pub const TCP_HDR_LEN_MIN: usize = 20;
pub const UDP_HDR_LEN_MIN: usize = 8;

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
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for BackendAddr {}
    unsafe impl aya::Pod for QueueHead {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for TrafficCounter {}
    unsafe impl aya::Pod for SockBackendKey {}
    unsafe impl aya::Pod for SockVip {}
    unsafe impl aya::Pod for PassiveEvent {}
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
        for (position, event) in SockLbEvent::ALL.iter().enumerate() {
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

    fn settings() -> Settings {
        let g = LAST_SEEN_GRANULARITY_NS;
        Settings {
            timeouts_ns: Timeouts {
                tcp_syn_ns: 60 * g,
                tcp_established_ns: 3600 * g,
                tcp_closing_ns: 120 * g,
                tcp_closed_ns: 5 * g,
                udp_unreplied_ns: 30 * g,
                udp_established_ns: 60 * g,
            }
            .table(),
            ..Settings::default()
        }
    }

    #[test]
    fn state_follows_the_bits_in_order() {
        let state = |flags| {
            Flow {
                flags,
                ..Flow::default()
            }
            .state()
        };
        assert_eq!(state(0), FlowState::New);
        assert_eq!(state(FLOW_SEEN_REPLY), FlowState::Replied);
        assert_eq!(
            state(FLOW_SEEN_REPLY | FLOW_ASSURED),
            FlowState::Established
        );
        assert_eq!(
            state(FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_FIN_BACKEND),
            FlowState::Closing
        );
        assert_eq!(
            state(FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_FIN_BACKEND | FLOW_FIN_CLIENT),
            FlowState::Closed
        );
        assert_eq!(
            state(FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_RESET),
            FlowState::Closed
        );
        // A FIN before the flow is assured leaves it embryonic.
        assert_eq!(state(FLOW_FIN_CLIENT), FlowState::New);
        assert_eq!(state(FLOW_FIN_CLIENT | FLOW_SEEN_REPLY), FlowState::Replied);
        assert!(
            Flow {
                flags: FLOW_FIN_CLIENT,
                ..Flow::default()
            }
            .is_evictable()
        );
        assert!(
            !Flow {
                flags: FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_FIN_CLIENT,
                ..Flow::default()
            }
            .is_evictable()
        );
        assert!(
            Flow {
                flags: FLOW_ASSURED | FLOW_RESET,
                ..Flow::default()
            }
            .is_evictable()
        );
        // Local: assured by both sides (the tc egress program sees the
        // backend's), so kept against eviction as a NATed flow is.
        assert!(
            !Flow {
                flags: FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_LOCAL,
                ..Flow::default()
            }
            .is_evictable()
        );
    }

    #[test]
    fn the_branchless_rules_agree_with_the_state() {
        for flags in 0..64u32 {
            let flow = Flow {
                flags,
                ..Flow::default()
            };
            let state = flow.state();
            assert_eq!(
                flow.is_evictable(),
                matches!(
                    state,
                    FlowState::Closed | FlowState::New | FlowState::Replied
                ),
                "{flags:#x}"
            );
            let tcp = match state {
                FlowState::New | FlowState::Replied => TIMEOUT_TCP_EMBRYONIC,
                FlowState::Established => TIMEOUT_TCP_ESTABLISHED,
                FlowState::Closing => TIMEOUT_TCP_CLOSING,
                FlowState::Closed => TIMEOUT_TCP_CLOSED,
            };
            assert_eq!(flow.timeout_class(PROTO_TCP), tcp, "{flags:#x}");
            if flags & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND | FLOW_RESET) == 0 {
                let udp = if flags & FLOW_ASSURED != 0 {
                    TIMEOUT_UDP_ESTABLISHED
                } else {
                    TIMEOUT_UDP_UNREPLIED
                };
                assert_eq!(flow.timeout_class(PROTO_UDP), udp, "{flags:#x}");
            }
        }
    }

    #[test]
    fn flows_expire_after_their_states_timeout() {
        let s = settings();
        let g = LAST_SEEN_GRANULARITY_NS;
        let flow = |flags| Flow {
            flags,
            last_seen_ns: 1000 * g,
            ..Flow::default()
        };
        let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
        for (flags, protocol, timeout) in [
            (0, PROTO_TCP, 60),
            (FLOW_SEEN_REPLY, PROTO_TCP, 60),
            (established, PROTO_TCP, 3600),
            (established | FLOW_FIN_CLIENT, PROTO_TCP, 120),
            (established | FLOW_RESET, PROTO_TCP, 5),
            (FLOW_RESET, PROTO_TCP, 5),
            (0, PROTO_UDP, 30),
            (FLOW_SEEN_REPLY, PROTO_UDP, 30),
            (established, PROTO_UDP, 60),
        ] {
            let f = flow(flags);
            assert!(
                !f.is_expired(protocol, &s, (1001 + timeout) * g),
                "{flags:#x}/{protocol}"
            );
            assert!(
                f.is_expired(protocol, &s, (1001 + timeout) * g + 1),
                "{flags:#x}/{protocol}"
            );
        }
        // Saturating: a flow from the far future, or a huge timeout, never wraps.
        let far = Flow {
            last_seen_ns: u64::MAX - 1,
            ..Flow::default()
        };
        assert!(!far.is_expired(PROTO_TCP, &s, u64::MAX));
    }

    #[test]
    fn tcp_flag_combinations_are_those_conntrack_accepts() {
        let valid: [u8; 9] = [
            TCP_SYN,
            TCP_SYN | TCP_URG,
            TCP_SYN | TCP_ACK,
            TCP_RST,
            TCP_RST | TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_FIN | TCP_ACK | TCP_URG,
            TCP_ACK,
            TCP_ACK | TCP_URG,
        ];
        for flags in 0..=255u8 {
            let expected = valid.contains(&(flags & 0x37));
            assert_eq!(tcp_flags_valid(flags), expected, "{flags:#04x}");
        }
        assert!(
            tcp_flags_valid(TCP_ACK | TCP_PSH | 0xc0),
            "PSH, ECE and CWR do not matter"
        );
        assert!(!tcp_flags_valid(0), "no flags at all");
        assert!(!tcp_flags_valid(TCP_SYN | TCP_FIN));
        assert!(!tcp_flags_valid(TCP_FIN), "FIN without ACK");
        assert!(tcp_bare_syn(TCP_SYN) && tcp_bare_syn(TCP_SYN | TCP_URG));
        assert!(!tcp_bare_syn(TCP_SYN | TCP_ACK) && !tcp_bare_syn(TCP_SYN | TCP_RST));
    }

    #[test]
    fn only_a_packet_of_the_right_direction_and_state_advances_a_flow() {
        let syn = TCP_SYN;
        let ack = TCP_ACK;
        // Handshake: SYN creates, the backend's SYN+ACK answers, the client's ACK confirms.
        assert_eq!(client_packet_bits(0, syn, true), 0);
        assert_eq!(backend_packet_bits(syn | ack), FLOW_SEEN_REPLY);
        assert_eq!(
            client_packet_bits(FLOW_SEEN_REPLY, ack, false),
            FLOW_ASSURED
        );
        // A client packet never answers for the backend; a retransmitted SYN confirms nothing.
        assert_eq!(client_packet_bits(0, ack, false), 0);
        assert_eq!(client_packet_bits(FLOW_SEEN_REPLY, syn, false), 0);
        // FIN and RST from each side.
        assert_eq!(
            client_packet_bits(FLOW_SEEN_REPLY | FLOW_ASSURED, TCP_FIN | ack, false),
            FLOW_FIN_CLIENT | FLOW_ASSURED
        );
        assert_eq!(
            backend_packet_bits(TCP_FIN | ack),
            FLOW_SEEN_REPLY | FLOW_FIN_BACKEND
        );
        assert_eq!(
            client_packet_bits(FLOW_SEEN_REPLY, TCP_RST | ack, false),
            FLOW_RESET
        );
        assert_eq!(backend_packet_bits(TCP_RST), FLOW_RESET);
        // A first packet: RST is born closed, FIN sets its bit, nothing is answered.
        assert_eq!(client_packet_bits(0, TCP_RST, true), FLOW_RESET);
        assert_eq!(client_packet_bits(FLOW_LOCAL, ack, true), 0);
        // Local flows as NATed ones: the backend's answer (seen at egress) first.
        assert_eq!(client_packet_bits(FLOW_LOCAL, ack, false), 0);
        assert_eq!(
            client_packet_bits(FLOW_LOCAL | FLOW_SEEN_REPLY, ack, false),
            FLOW_ASSURED
        );
        assert_eq!(client_packet_bits(FLOW_LOCAL, syn, false), 0);
        // UDP has no flags: a reply then a client packet establish it.
        assert_eq!(backend_packet_bits(0), FLOW_SEEN_REPLY);
        assert_eq!(client_packet_bits(FLOW_SEEN_REPLY, 0, false), FLOW_ASSURED);
    }

    /// The branch-free bit rules against a plain reading of the table in
    /// docs/data-path.md, for every flags byte and every flow state.
    #[test]
    fn the_bit_rules_match_their_plain_reading_everywhere() {
        let client = |current: u32, f: u8, first: bool| -> u32 {
            if f & TCP_RST != 0 {
                return FLOW_RESET;
            }
            let mut add = 0;
            if f & TCP_FIN != 0 {
                add |= FLOW_FIN_CLIENT;
            }
            if !first && !tcp_bare_syn(f) && current & FLOW_SEEN_REPLY != 0 {
                add |= FLOW_ASSURED;
            }
            add
        };
        let backend = |f: u8| -> u32 {
            if f & TCP_RST != 0 {
                FLOW_RESET
            } else if f & TCP_FIN != 0 {
                FLOW_SEEN_REPLY | FLOW_FIN_BACKEND
            } else {
                FLOW_SEEN_REPLY
            }
        };
        for f in 0..=255u8 {
            assert_eq!(backend_packet_bits(f), backend(f), "{f:#04x}");
            for current in 0..64u32 {
                for first in [false, true] {
                    assert_eq!(
                        client_packet_bits(current, f, first),
                        client(current, f, first),
                        "{current:#x} {f:#04x} {first}"
                    );
                }
            }
        }
    }

    #[test]
    fn nat_ranges_match_address_and_port() {
        let addr = addr_to_wire([10, 0, 0, 2]);
        let mut s = Settings::default();
        s.nat[0] = NatRange {
            addr,
            port_min: 20000,
            port_max: 20999,
        };
        s.nat[2] = NatRange {
            addr,
            port_min: 10000,
            port_max: 10009,
        };
        assert!(s.is_nat_port(addr, port_to_wire(20000)));
        assert!(s.is_nat_port(addr, port_to_wire(10009)));
        assert!(!s.is_nat_port(addr, port_to_wire(10010)));
        assert!(!s.is_nat_port(addr_to_wire([10, 0, 0, 3]), port_to_wire(20000)));
        assert!(
            !Settings::default().is_nat_port(0, port_to_wire(0)),
            "unused ranges match nothing"
        );
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
