//! A pure-Rust reference model of the ha-lb data path.
//!
//! This crate is a second, independent description of `docs/data-path.md` (the normative
//! specification of the XDP program in `ha-ebpf`). The differential fuzzer feeds the same frames
//! to the XDP program (through `BPF_PROG_TEST_RUN`) and to [`Model::process`], and compares after
//! every packet: the XDP action, the verdict, the output frame and every map ([`State`]).
//!
//! It shares only the map *types*, constants and the two hashes (`flow_hash`,
//! `nat_port_candidate`) with `ha-common`; every decision (flow states, timeouts, expiry, TCP
//! flag validity, NAT range membership, checksums) is written again here from the spec.
//!
//! The pipeline, one module per step of "Processing a frame":
//!
//! | spec section | module |
//! |---|---|
//! | 1. Parse | [`parse`] |
//! | 2. Classify | [`classify`] |
//! | The flow state machine | [`flow`] |
//! | 3. (steps 3, 5b, forgetting) | [`conntrack`] |
//! | 3. (step 5, 5a) | [`select`] |
//! | 3. A client packet to a VIP | [`client`] |
//! | 4. A backend reply | [`reply`] |
//! | 5. Rewrite | [`nat`] |
//! | ICMP (errors translated and answered) | [`icmp`] |
//! | 6. Forward | [`forward`] |
//! | Passive health (suspects, selection's detour, L4 redispatch) | [`passive`] |
//! | The agent's sweep | [`sweep`] |
//! | Local backends: the tc egress program | [`egress`] |
//!
//! [`frame`] builds and checks test frames (used by the tests here, and available to the fuzzer).
//!
//! # Choices where the spec is silent or ambiguous
//!
//! Each is documented where it is made; in short:
//!
//! 1. `midstream_pickup` is counted for every created TCP flow whose first packet is not a bare
//!    SYN, *including an RST* (see [`client`]).
//! 2. The `reverse_recovered` event of step 3.4 is counted only when the insert succeeds
//!    (see [`client`]).
//! 3. Maglev slot: `table_size == 0` selects nothing (`drop_no_backend`); the index
//!    `table_offset + hash % M` wraps in `u32` (see [`select`]).
//! 4. A flow *names* a reverse entry by `nat_addr`, `nat_port` and `backend_id` only; the
//!    `LOCAL` bit is checked separately where the spec says so (section 4). A reverse entry
//!    *names* a flow key when its `flow` equals it (see [`flow::names`]).
//! 5. UDP timeouts for the states UDP cannot reach (closing, closed) are those of the
//!    `ASSURED` bit: `udp_idle_timeout` when set, `udp_unreplied_timeout` otherwise
//!    (see [`flow::timeout_ns`]).
//! 6. Checksums: every 16-bit word of every replaced field goes through RFC 1624 eqn. 3, even
//!    when it does not change, in the order source address, destination address, source port,
//!    destination port (the order does not change the result; skipping unchanged words would,
//!    for an incoming checksum of `0xffff`) (see [`nat`]).
//! 7. `VIP_STATS` has [`VIP_STATS_SLOTS`] entries and `BACKEND_STATS` [`BACKEND_STATS_SLOTS`];
//!    traffic for a slot or id outside them is not counted. `BACKENDS` is missing for an id
//!    `>= min(config.backends.len(), MAX_BACKENDS)`.
//! 8. `flow_reset` is counted when a packet adds `RESET` to a flow that lacked it, and for a
//!    flow created by an RST (the spec says so since the fuzzer's first runs).
//! 9. The sweep walks its snapshots in key order (the agent's order is the kernel's hash
//!    order; the spec makes the result independent of it: a lost reverse entry is restored only
//!    for a nat key one live flow alone names), and a live flow whose `BACKENDS` record is
//!    missing has no nat key, so nothing is recovered for it (see [`sweep`]).
//! 10. The nat key of a flow uses the flow key's protocol.
//! 11. "Forgetting" removes the reverse entry when its `flow` is the key (its `backend_id` is
//!     not compared).
//! 12. Invalid TCP flags are checked where the numbered steps put them (after a disabled VIP,
//!     IP options and a first fragment), not literally "before anything else looks at it".
//! 13. An `EMBRYONIC_HEAD` slot beyond the `EMBRYONIC` array (setting larger than the array)
//!     skips step 5b entirely, head included (see [`conntrack`]).
//! 14. Degenerate NAT ranges are followed literally: `nat[0].addr == 0` still claims ports
//!     (replies to it are never classified), `port_min > port_max` takes whatever
//!     `nat_port_candidate` gives (its span wraps).
//! 15. 5a's third pass forgets an expired or evictable owner with the flow value it just read.
//!
//! [`Config::vips`] is a `HashMap` (`ha_common::VipKey` is `Hash`, not `Ord`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ha_common::{
    BackendAddr, BackendInfo, Counter, Event, Flow, FlowKey, MAX_BACKENDS, MAX_VIPS, NatEntry,
    NatKey, PassiveEvent, QueueHead, Settings, TrafficCounter, Verdict, VipInfo, VipKey,
};

pub mod classify;
pub mod client;
pub mod conntrack;
pub mod egress;
pub mod flow;
pub mod forward;
pub mod frame;
pub mod icmp;
pub mod nat;
pub mod parse;
pub mod passive;
pub mod reply;
pub mod select;
pub mod sweep;

mod ctx;

pub use ctx::Ctx;

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`.
pub const XDP_REDIRECT: u32 = 4;

/// Entries of `VIP_STATS` (indexed by `VipInfo::slot`): `MAX_VIPS`.
pub const VIP_STATS_SLOTS: u32 = MAX_VIPS;
/// Entries of `BACKEND_STATS` (indexed by backend id): `MAX_BACKENDS`.
pub const BACKEND_STATS_SLOTS: u32 = MAX_BACKENDS;

/// The agent-written configuration maps, as the data path reads them.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `SETTINGS[0]`.
    pub settings: Settings,
    /// `VIPS`. A `HashMap`, not the brief's `BTreeMap`: `ha_common::VipKey` does not implement
    /// `Ord` (it derives `Hash`), and ha-common is not this crate's to change. Inserting and
    /// looking up read the same either way.
    pub vips: HashMap<VipKey, VipInfo>,
    /// BACKENDS indexed by backend id; ids >= len() are "missing" (a real array entry with addr 0
    /// is a present record with addr 0). Ids `>= MAX_BACKENDS` are missing too (the array's size).
    pub backends: Vec<BackendInfo>,
    /// `BACKEND_INDEX`.
    pub backend_index: BTreeMap<BackendAddr, u32>,
    /// MAGLEV: index -> backend id; indexes >= len() are missing.
    pub maglev: Vec<u32>,
    /// Interface indexes in TX_PORTS (XDP_REDIRECT targets).
    pub tx_ports: BTreeSet<u32>,
}

impl Config {
    /// `BACKENDS[id]`, `None` when the record is missing (see [`Config::backends`]).
    pub fn backend(&self, id: u32) -> Option<BackendInfo> {
        if id >= MAX_BACKENDS {
            return None;
        }
        self.backends.get(usize::try_from(id).ok()?).copied()
    }
}

/// What bpf_fib_lookup answers, supplied by the environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FibAnswer {
    /// `BPF_FIB_LKUP_RET_SUCCESS`: egress interface and the MACs to write.
    Success {
        /// Egress interface.
        ifindex: u32,
        /// Source MAC (the egress interface's).
        smac: [u8; 6],
        /// Destination MAC (the next hop's).
        dmac: [u8; 6],
    },
    /// `BPF_FIB_LKUP_RET_NO_NEIGH`.
    NoNeighbour,
    /// `BPF_FIB_LKUP_RET_FRAG_NEEDED`: `tot_len` is above the route's MTU (`mtu_result`).
    FragNeeded {
        /// The route's MTU.
        mtu: u16,
    },
    /// `BPF_FIB_LKUP_RET_NOT_FWDED`: no route, or a local or broadcast destination.
    NoRoute,
    /// `BPF_FIB_LKUP_RET_BLACKHOLE`.
    Blackhole,
    /// `BPF_FIB_LKUP_RET_UNREACHABLE`.
    Unreachable,
    /// `BPF_FIB_LKUP_RET_PROHIBIT`.
    Prohibit,
    /// `BPF_FIB_LKUP_RET_FWD_DISABLED`: forwarding is off on the ingress interface.
    ForwardingDisabled,
    /// Any other answer (an unsupported lightweight tunnel, no source address).
    Failure,
}

/// The FIB the data path asks (`bpf_fib_lookup`).
pub trait Fib {
    /// `src`/`dst` are the rewritten addresses, `tot_len` the IPv4 total length (host order).
    fn lookup(
        &self,
        ingress_ifindex: u32,
        src: std::net::Ipv4Addr,
        dst: std::net::Ipv4Addr,
        tot_len: u16,
    ) -> FibAnswer;
}

/// Any closure with the same arguments is a FIB.
impl<F> Fib for F
where
    F: Fn(u32, std::net::Ipv4Addr, std::net::Ipv4Addr, u16) -> FibAnswer,
{
    fn lookup(
        &self,
        ingress_ifindex: u32,
        src: std::net::Ipv4Addr,
        dst: std::net::Ipv4Addr,
        tot_len: u16,
    ) -> FibAnswer {
        self(ingress_ifindex, src, dst, tot_len)
    }
}

/// The map state the data path leaves (everything the fuzzer compares). Per-CPU maps are
/// modelled for one CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// `CONNTRACK`.
    pub conntrack: BTreeMap<FlowKey, Flow>,
    /// `REVERSE_NAT`.
    pub reverse: BTreeMap<NatKey, NatEntry>,
    /// EMBRYONIC, the CPU's queue of recent flows: exactly `embryonic_slots` entries
    /// (FlowKey::EMPTY = never written).
    pub embryonic: Vec<FlowKey>,
    /// `EMBRYONIC_HEAD[0]`: the next slot and the queue's length.
    pub embryonic_head: QueueHead,
    /// VERDICTS, indexed by `Verdict as usize`.
    pub verdicts: Vec<Counter>,
    /// EVENTS, indexed by `Event as usize`.
    pub events: Vec<u64>,
    /// EGRESS_VERDICTS (the tc egress program's), indexed by `EgressVerdict as usize`.
    pub egress_verdicts: Vec<Counter>,
    /// VIP_STATS by VIP slot; only nonzero entries are kept.
    pub vip_stats: BTreeMap<u32, TrafficCounter>,
    /// BACKEND_STATS by backend id; only nonzero entries are kept.
    pub backend_stats: BTreeMap<u32, TrafficCounter>,
    /// `SUSPECT` by backend id; only nonzero entries are kept (writing 0 removes one).
    pub suspect: BTreeMap<u32, u64>,
    /// The records put into the `PASSIVE_EVENTS` ring, oldest first.
    pub passive_events: Vec<PassiveEvent>,
    /// `REDISPATCHED`: flow keys redispatched, and when.
    pub redispatched: BTreeMap<FlowKey, u64>,
}

impl State {
    /// Empty tables, an empty queue of `embryonic_slots`, zeroed counters of the right sizes.
    pub fn empty(embryonic_slots: u32) -> State {
        State {
            embryonic: vec![FlowKey::EMPTY; embryonic_slots as usize],
            verdicts: vec![Counter::default(); Verdict::COUNT as usize],
            events: vec![0; Event::COUNT as usize],
            egress_verdicts: vec![Counter::default(); ha_common::EgressVerdict::COUNT as usize],
            ..State::default()
        }
    }

    /// The count of `event` (0 if the vector is short).
    pub fn event(&self, event: Event) -> u64 {
        self.events.get(event as usize).copied().unwrap_or(0)
    }

    /// The counter of `verdict` (zero if the vector is short).
    pub fn verdict(&self, verdict: Verdict) -> Counter {
        self.verdicts
            .get(verdict as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// The result of one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action: 1 DROP, 2 PASS, 3 TX, 4 REDIRECT.
    pub action: u32,
    /// The one `VERDICTS` slot this frame counted in.
    pub verdict: Verdict,
    /// The frame as the program leaves it (for PASS: the input unchanged, except a local flow's
    /// translated frame; for DROP: whatever, not compared).
    pub output: Vec<u8>,
}

/// What one sweep did (steps 1 and 2 of "The agent's sweep").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows of the snapshot found not expired.
    pub live: usize,
    /// Flows of the snapshot found expired and forgotten.
    pub expired: usize,
    /// Reverse entries re-inserted for live flows.
    pub reverse_recovered: usize,
    /// Reverse entries removed as orphans.
    pub orphans_freed: usize,
}

/// The max entries of the two tables (plain BPF hash maps: inserting a NEW key fails when one
/// already holds this many; replacing an existing key always works).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `CONNTRACK`.
    pub conntrack: usize,
    /// `REVERSE_NAT`.
    pub reverse: usize,
}

impl Capacity {
    /// Both tables of the same size.
    pub const fn both(entries: usize) -> Capacity {
        Capacity {
            conntrack: entries,
            reverse: entries,
        }
    }
}

/// The data path's model: configuration, map state and table sizes.
#[derive(Clone, Debug)]
pub struct Model {
    /// The agent-written maps.
    pub config: Config,
    /// The data-path-written maps.
    pub state: State,
    /// Max entries of the two tables.
    pub capacity: Capacity,
}

impl Model {
    /// `embryonic_slots`: size of the EMBRYONIC array (the program uses
    /// `config.settings.embryonic_slots`, bounded by the array).
    pub fn new(config: Config, capacity: Capacity, embryonic_slots: u32) -> Model {
        Model {
            config,
            state: State::empty(embryonic_slots),
            capacity,
        }
    }

    /// `now` as the spec defines it: `Settings.clock_ns` unless 0, else the kernel clock.
    pub fn now(&self, kernel_now_ns: u64) -> u64 {
        match self.config.settings.clock_ns {
            0 => kernel_now_ns,
            virtual_clock => virtual_clock,
        }
    }

    /// One frame through the data path. `kernel_now_ns` is the kernel clock, used only when
    /// `config.settings.clock_ns == 0`.
    pub fn process(
        &mut self,
        frame: &[u8],
        ingress_ifindex: u32,
        kernel_now_ns: u64,
        fib: &dyn Fib,
    ) -> Outcome {
        let now = self.now(kernel_now_ns);
        let mut ctx = Ctx::new(&self.config, &mut self.state, self.capacity, now);
        let mut output = frame.to_vec();
        let (action, verdict) = ctx.run(&mut output, ingress_ifindex, fib);
        ctx.count_verdict(verdict, frame.len());
        if action == XDP_PASS && verdict != Verdict::PassLocalBackend {
            // A passed frame is never touched (the pipeline does not write before deciding to
            // pass), except a local flow's, translated for delivery; this only makes it evident.
            output.clear();
            output.extend_from_slice(frame);
        }
        Outcome {
            action,
            verdict,
            output,
        }
    }

    /// The agent's sweep, steps 1 and 2 of "The agent's sweep" in the spec (not NAT-range pruning
    /// or backend freeing).
    pub fn sweep(&mut self, now_ns: u64) -> SweepReport {
        let mut ctx = Ctx::new(&self.config, &mut self.state, self.capacity, now_ns);
        ctx.sweep()
    }
}
