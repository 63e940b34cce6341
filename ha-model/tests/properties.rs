//! Property tests: invariants that hold for any sequence of (time step, packet) on a small
//! world, starting from empty tables, with no external damage.

mod common;

use std::collections::BTreeSet;

use common::*;
use ha_common::{
    FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_LOCAL, FLOW_RESET, FlowKey, NatKey,
    PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TCP_URG, addr_from_wire,
    port_from_wire,
};
use ha_model::flow::is_expired;
use ha_model::frame::{FrameSpec, ipv4_checksum_ok, l4_checksum_ok};
use ha_model::parse::parse;
use ha_model::{Model, State, XDP_PASS, XDP_REDIRECT, XDP_TX};
use proptest::prelude::*;

/// A step of a generated sequence.
#[derive(Clone, Debug)]
enum Step {
    /// A client packet to a VIP (TCP :80 or UDP :53).
    Client {
        client: usize,
        sport: u16,
        udp: bool,
        flags: u8,
        payload: usize,
        vlan: bool,
        options: bool,
        first_fragment: bool,
    },
    /// A reply from the backend of the `pick`-th NAT flow in the table (if any).
    Reply {
        pick: usize,
        flags: u8,
        payload: usize,
    },
    /// A backend's packet to any port near the NAT range.
    BackendPacket {
        backend: usize,
        nat_port: u16,
        old_range: bool,
        udp: bool,
        flags: u8,
    },
    /// A packet to the disabled VIP.
    Disabled { client: usize, flags: u8 },
    /// A truncated client packet.
    Truncated {
        client: usize,
        sport: u16,
        cut: usize,
    },
    /// Not IPv4.
    Arp,
    /// The agent's sweep.
    Sweep,
}

fn tcp_flags() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(TCP_SYN),
        5 => Just(TCP_ACK),
        2 => Just(TCP_ACK | TCP_PSH),
        2 => Just(TCP_FIN | TCP_ACK),
        1 => Just(TCP_RST),
        1 => Just(TCP_RST | TCP_ACK),
        2 => Just(TCP_SYN | TCP_ACK),
        1 => Just(TCP_SYN | TCP_URG),
        1 => any::<u8>(),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        10 => (
            0..3usize,
            40000..40004u16,
            prop::bool::weighted(0.25),
            tcp_flags(),
            0..30usize,
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.03),
            prop::bool::weighted(0.03),
        )
            .prop_map(|(client, sport, udp, flags, payload, vlan, options, first_fragment)| {
                Step::Client {
                    client,
                    sport,
                    udp,
                    flags,
                    payload,
                    vlan,
                    options,
                    first_fragment,
                }
            }),
        8 => (any::<usize>(), tcp_flags(), 0..30usize)
            .prop_map(|(pick, flags, payload)| Step::Reply { pick, flags, payload }),
        1 => (
            0..3usize,
            NAT_MIN - 1..=NAT_MAX + 1,
            prop::bool::weighted(0.2),
            any::<bool>(),
            tcp_flags(),
        )
            .prop_map(|(backend, nat_port, old_range, udp, flags)| Step::BackendPacket {
                backend,
                nat_port,
                old_range,
                udp,
                flags,
            }),
        1 => (0..3usize, tcp_flags()).prop_map(|(client, flags)| Step::Disabled { client, flags }),
        1 => (0..3usize, 40000..40004u16, 0..60usize)
            .prop_map(|(client, sport, cut)| Step::Truncated { client, sport, cut }),
        1 => Just(Step::Arp),
        1 => Just(Step::Sweep),
    ]
}

/// Time between steps: often nothing or a little, sometimes past G or a timeout.
fn delay() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(0u64),
        4 => 1..1_000u64,
        2 => Just(G / 2),
        2 => Just(G + 1),
        1 => 2 * G..4 * G,
        1 => Just(7 * G),
        1 => Just(40 * G),
    ]
}

#[derive(Clone, Debug)]
struct World {
    capacity: usize,
    slots: u32,
    steps: Vec<(u64, Step)>,
}

fn world() -> impl Strategy<Value = World> {
    (
        2..=8usize,
        0..=4u32,
        prop::collection::vec((delay(), step()), 1..80),
    )
        .prop_map(|(capacity, slots, steps)| World {
            capacity,
            slots,
            steps,
        })
}

/// The frame a step sends (`None` for a sweep or a reply with no flow to answer).
fn frame_of(step: &Step, m: &Model) -> Option<Vec<u8>> {
    Some(match *step {
        Step::Client {
            client,
            sport,
            udp,
            flags,
            payload,
            vlan,
            options,
            first_fragment,
        } => {
            let mut spec = if udp {
                client_udp(client, sport)
            } else {
                client_tcp(client, sport, flags)
            }
            .payload(payload);
            if vlan {
                spec = spec.vlan(5);
            }
            if options {
                spec = spec.options(4);
            }
            if first_fragment {
                spec = spec.fragment(0x2000);
            }
            spec.build()
        }
        Step::Reply {
            pick,
            flags,
            payload,
        } => {
            let nat_flows: Vec<(&FlowKey, &ha_common::Flow)> = m
                .state
                .conntrack
                .iter()
                .filter(|(_, f)| f.flags & FLOW_LOCAL == 0)
                .collect();
            if nat_flows.is_empty() {
                return None;
            }
            let (key, flow) = nat_flows[pick % nat_flows.len()];
            let backend = m.config.backends[flow.backend_id as usize];
            let (src, sport) = (addr_from_wire(backend.addr), port_from_wire(backend.port));
            let (dst, dport) = (addr_from_wire(flow.nat_addr), port_from_wire(flow.nat_port));
            if key.protocol == PROTO_UDP {
                FrameSpec::udp(src, sport, dst, dport)
            } else {
                FrameSpec::tcp(src, sport, dst, dport, flags)
            }
            .payload(payload)
            .build()
        }
        Step::BackendPacket {
            backend,
            nat_port,
            old_range,
            udp,
            flags,
        } => {
            let (nat, port) = if old_range {
                (OLD_NAT, OLD_NAT_MIN + nat_port - NAT_MIN)
            } else {
                (LB, nat_port)
            };
            if udp {
                backend_udp(backend, nat, port).build()
            } else {
                backend_tcp(backend, nat, port, flags).build()
            }
        }
        Step::Disabled { client, flags } => {
            FrameSpec::tcp(CLIENTS[client], 40000, DISABLED_VIP, VIP_TCP_PORT, flags).build()
        }
        Step::Truncated { client, sport, cut } => {
            let full = client_tcp(client, sport, TCP_ACK).payload(10).build();
            full[..(14 + cut).min(full.len() - 1)].to_vec()
        }
        Step::Arp => {
            let mut f = vec![0u8; 42];
            f[12] = 0x08;
            f[13] = 0x06;
            f
        }
        Step::Sweep => return None,
    })
}

fn nat_key_of(m: &Model, key: &FlowKey, flow: &ha_common::Flow) -> NatKey {
    let backend = m.config.backends[flow.backend_id as usize];
    NatKey {
        backend_addr: backend.addr,
        lb_addr: flow.nat_addr,
        backend_port: backend.port,
        nat_port: flow.nat_port,
        protocol: key.protocol,
        _pad: [0; 3],
    }
}

/// The invariants of one state.
fn check_state(m: &Model, capacity: usize, slots: u32) -> Result<(), TestCaseError> {
    let s = &m.state;
    prop_assert!(s.conntrack.len() <= capacity);
    prop_assert!(s.reverse.len() <= capacity + 1);
    prop_assert_eq!(s.embryonic.len(), slots as usize);
    // Every flow (a local one too) has its reverse entry, naming it; no two flows share a nat
    // key.
    let mut nat_keys = BTreeSet::new();
    for (key, flow) in &s.conntrack {
        let nk = nat_key_of(m, key, flow);
        let entry = s.reverse.get(&nk);
        prop_assert!(entry.is_some(), "flow {:?} has no reverse entry", key);
        let entry = entry.unwrap();
        prop_assert_eq!(entry.flow, *key);
        prop_assert_eq!(entry.backend_id, flow.backend_id);
        prop_assert!(nat_keys.insert(nk), "nat key shared: {:?}", nk);
    }
    // Every reverse entry's flow exists and names it.
    for (nk, entry) in &s.reverse {
        let flow = s.conntrack.get(&entry.flow);
        prop_assert!(flow.is_some(), "orphan reverse entry {:?}", nk);
        let flow = flow.unwrap();
        prop_assert_eq!(nat_key_of(m, &entry.flow, flow), *nk);
        prop_assert_eq!(entry.backend_id, flow.backend_id);
    }
    // The queue of recent flows never holds more records than it has slots.
    prop_assert!(s.embryonic_head.len <= slots, "{:?}", s.embryonic_head);
    // Every NAT port is in the current range (a local flow's entry names its client's port).
    for (nk, entry) in &s.reverse {
        if s.conntrack[&entry.flow].flags & FLOW_LOCAL != 0 {
            prop_assert_eq!(nk.lb_addr, entry.flow.src_addr);
            prop_assert_eq!(nk.nat_port, entry.flow.src_port);
            continue;
        }
        prop_assert!((NAT_MIN..=NAT_MAX).contains(&port_from_wire(nk.nat_port)));
    }
    Ok(())
}

fn established(flags: u32) -> bool {
    flags & FLOW_ASSURED != 0 && flags & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND | FLOW_RESET) == 0
}

fn verdict_total(s: &State) -> u64 {
    s.verdicts.iter().map(|c| c.packets).sum()
}

/// The flows a frame belongs to: the client flow of its 5-tuple, and the flow its reverse entry
/// names.
fn own_flows(frame: &[u8], before: &State) -> Vec<FlowKey> {
    let Ok(p) = parse(frame) else {
        return Vec::new();
    };
    let key = FlowKey {
        src_addr: p.src_addr,
        dst_addr: p.dst_addr,
        src_port: p.src_port,
        dst_port: p.dst_port,
        protocol: p.protocol(),
        _pad: [0; 3],
    };
    let nk = NatKey {
        backend_addr: p.src_addr,
        lb_addr: p.dst_addr,
        backend_port: p.src_port,
        nat_port: p.dst_port,
        protocol: p.protocol(),
        _pad: [0; 3],
    };
    let mut own = vec![key];
    if let Some(entry) = before.reverse.get(&nk) {
        own.push(entry.flow);
    }
    own
}

/// The tables' sizes: the reverse table with a margin, as the agent sizes it (every flow, local
/// ones too, holds a reverse entry, so with equal sizes the reverse table would always fill
/// first and the connection table never be found full).
fn capacity(flows: usize) -> ha_model::Capacity {
    ha_model::Capacity {
        conntrack: flows,
        reverse: flows + 1,
    }
}

fn run(world: &World) -> Result<(), TestCaseError> {
    let mut config = config();
    config.settings.embryonic_slots = world.slots;
    let mut m = Model::new(config, capacity(world.capacity), world.slots);
    let mut now = START;
    check_state(&m, world.capacity, world.slots)?;
    for (delay, step) in &world.steps {
        now += delay;
        let before = m.state.clone();
        let frame = frame_of(step, &m);
        let own = match &frame {
            Some(frame) => {
                let own = own_flows(frame, &before);
                let out = m.process(frame, INGRESS, now, &fib);
                prop_assert_eq!(verdict_total(&m.state), verdict_total(&before) + 1);
                let counter = m.state.verdict(out.verdict);
                prop_assert_eq!(
                    counter.bytes,
                    before.verdict(out.verdict).bytes + frame.len() as u64
                );
                if out.action == XDP_PASS && out.verdict != ha_common::Verdict::PassLocalBackend {
                    prop_assert_eq!(&out.output, frame);
                }
                if out.action == XDP_TX || out.action == XDP_REDIRECT {
                    prop_assert_eq!(out.output.len(), frame.len());
                    if ipv4_checksum_ok(frame) == Some(true) {
                        prop_assert_eq!(ipv4_checksum_ok(&out.output), Some(true));
                    }
                    if l4_checksum_ok(frame) == Some(true) {
                        prop_assert_eq!(l4_checksum_ok(&out.output), Some(true));
                    }
                }
                own
            }
            None => {
                if matches!(step, Step::Sweep) {
                    m.sweep(now);
                }
                Vec::new()
            }
        };
        check_state(&m, world.capacity, world.slots)?;
        // An established flow, local or NATed, leaves only by its own packets or by expiring.
        for (key, flow) in &before.conntrack {
            if established(flow.flags)
                && !own.contains(key)
                && !is_expired(flow, key.protocol, &m.config.settings, now)
            {
                prop_assert!(
                    m.state.conntrack.contains_key(key),
                    "established {:?} removed by {:?}",
                    key,
                    step
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 192,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_for_any_sequence(world in world()) {
        run(&world)?;
    }
}

/// The generator reaches the interesting paths (checked once over a fixed seed's worth of runs).
#[test]
fn the_generator_reaches_the_interesting_paths() {
    use ha_common::{Event, Verdict};
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut events = vec![0u64; Event::COUNT as usize];
    let mut verdicts = vec![0u64; Verdict::COUNT as usize];
    let mut established_seen = false;
    for run in 0..300 {
        let world = world().new_tree(&mut runner).unwrap().current();
        let mut config = config();
        config.settings.embryonic_slots = world.slots;
        // Half the runs with tables of one size: the reverse table then fills first
        // (drop_nat_exhausted), the other half with the agent's margin (drop_table_full).
        let sizes = if run % 2 == 0 {
            capacity(world.capacity)
        } else {
            ha_model::Capacity::both(world.capacity)
        };
        let mut m = Model::new(config, sizes, world.slots);
        let mut now = START;
        for (delay, step) in &world.steps {
            now += delay;
            match frame_of(step, &m) {
                Some(frame) => {
                    m.process(&frame, INGRESS, now, &fib);
                }
                None => {
                    m.sweep(now);
                }
            }
            established_seen |= m.state.conntrack.values().any(|f| established(f.flags));
        }
        for (total, n) in events.iter_mut().zip(&m.state.events) {
            *total += n;
        }
        for (total, c) in verdicts.iter_mut().zip(&m.state.verdicts) {
            *total += c.packets;
        }
    }
    assert!(established_seen);
    for event in [
        Event::NewFlow,
        Event::MidstreamPickup,
        Event::ExpiredFlowReplaced,
        Event::NatPortCollision,
        Event::EmbryonicEvicted,
        Event::SynRestartedFlow,
        Event::ReplyToLearnedMac,
    ] {
        assert!(events[event as usize] > 0, "{}", event.label());
    }
    for verdict in [
        Verdict::ForwardTx,
        Verdict::ForwardRedirect,
        Verdict::ReplyTx,
        Verdict::PassLocalBackend,
        Verdict::DropNatExhausted,
        Verdict::DropTableFull,
        Verdict::DropReplyNoFlow,
        Verdict::DropInvalidTcpFlags,
        Verdict::DropNoTxPort,
        Verdict::PassMalformed,
        Verdict::PassVipDisabled,
    ] {
        assert!(verdicts[verdict as usize] > 0, "{}", verdict.label());
    }
    let _ = PROTO_TCP;
}

/// A frame made of arbitrary bytes, or a valid frame with some bytes overwritten.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        0..3usize,
        40000..40004u16,
        any::<bool>(),
        tcp_flags(),
        prop::collection::vec((0..80usize, any::<u8>()), 0..4),
        0..20usize,
    )
        .prop_map(|(client, sport, udp, flags, edits, pad)| {
            let mut f = if udp {
                client_udp(client, sport).padding(pad).build()
            } else {
                client_tcp(client, sport, flags).payload(pad).build()
            };
            for (at, value) in edits {
                if let Some(byte) = f.get_mut(at) {
                    *byte = value;
                }
            }
            f
        });
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 14..120),
        3 => mutated,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// No input panics, whatever the configuration; every frame counts once; a passed frame is
    /// unchanged.
    #[test]
    fn any_frame_any_config_counts_once_and_never_panics(
        frames in prop::collection::vec((delay(), any_frame()), 1..40),
        table_size in prop_oneof![Just(0u32), 1..9u32, Just(u32::MAX)],
        table_offset in prop_oneof![Just(0u32), Just(u32::MAX - 2), 0..20u32],
        port_range in (any::<u16>(), any::<u16>()),
        ring in (0..4u32, 0..4u32, any::<u32>(), any::<u32>()),
        capacity in 0..5usize,
        clock in prop_oneof![Just(0u64), any::<u64>()],
    ) {
        let mut config = config();
        for vip in config.vips.values_mut() {
            vip.table_size = table_size;
            vip.table_offset = table_offset;
        }
        config.settings.nat[0].port_min = port_range.0;
        config.settings.nat[0].port_max = port_range.1;
        config.settings.embryonic_slots = ring.0;
        config.settings.clock_ns = clock;
        let mut m = Model::new(config, self::capacity(capacity), ring.1);
        m.state.embryonic_head = ha_common::QueueHead { next: ring.2, len: ring.3 };
        let mut now = START;
        for (i, (delay, frame)) in frames.iter().enumerate() {
            now = now.saturating_add(*delay);
            let before = verdict_total(&m.state);
            let out = m.process(frame, INGRESS, now, &fib);
            prop_assert_eq!(verdict_total(&m.state), before + 1);
            prop_assert!((1..=4).contains(&out.action));
            if out.action == XDP_PASS && out.verdict != ha_common::Verdict::PassLocalBackend {
                prop_assert_eq!(&out.output, frame);
            } else {
                prop_assert_eq!(out.output.len(), frame.len());
            }
            prop_assert!(m.state.conntrack.len() <= capacity);
            prop_assert!(m.state.reverse.len() <= capacity + 1);
            prop_assert_eq!(m.state.embryonic.len(), ring.1 as usize);
            if i % 7 == 6 {
                m.sweep(now);
            }
        }
    }
}
