//! End-to-end scenarios through `Model::process` and `Model::sweep`, one or more per path of
//! docs/data-path.md.

mod common;

use common::*;
use ha_common::hash::flow_hash;
use ha_common::{
    BACKEND_FLAG_DOWN, Event, FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_LOCAL,
    FLOW_RESET, FLOW_SEEN_REPLY, Flow, FlowKey, NO_BACKEND, NatKey, PROTO_TCP, PROTO_UDP, TCP_ACK,
    TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, Verdict, addr_to_wire, port_from_wire, port_to_wire,
};
use ha_model::frame::{FrameSpec, ipv4_checksum_ok, l4_checksum_ok};
use ha_model::parse::parse;
use ha_model::{Model, Outcome, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

const SYN: u8 = TCP_SYN;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const ACK: u8 = TCP_ACK;
const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
const EST: u32 = FLOW_SEEN_REPLY | FLOW_ASSURED;

fn key(client: usize, sport: u16, protocol: u8) -> FlowKey {
    FlowKey {
        src_addr: addr_to_wire(CLIENTS[client]),
        dst_addr: addr_to_wire(VIP),
        src_port: port_to_wire(sport),
        dst_port: port_to_wire(if protocol == PROTO_TCP {
            VIP_TCP_PORT
        } else {
            VIP_UDP_PORT
        }),
        protocol,
        _pad: [0; 3],
    }
}

/// The backend Maglev gives this client flow.
fn maglev_backend(m: &Model, k: &FlowKey) -> u32 {
    let (offset, size) = if k.protocol == PROTO_TCP {
        (0, 7)
    } else {
        (7, 5)
    };
    m.config.maglev[(offset + flow_hash(k) % size) as usize]
}

/// A source port of `client` whose flow goes to `backend`.
fn port_to(m: &Model, client: usize, protocol: u8, backend: u32) -> u16 {
    (40000..41000)
        .find(|p| maglev_backend(m, &key(client, *p, protocol)) == backend)
        .unwrap()
}

struct Run {
    m: Model,
    now: u64,
}

impl Run {
    fn new(capacity: usize) -> Run {
        Run {
            m: model(capacity),
            now: START,
        }
    }

    fn send(&mut self, frame: &[u8]) -> Outcome {
        let before: u64 = self.m.state.verdicts.iter().map(|c| c.packets).sum();
        let out = self.m.process(frame, INGRESS, self.now, &fib);
        let after: u64 = self.m.state.verdicts.iter().map(|c| c.packets).sum();
        assert_eq!(after, before + 1);
        // A pass leaves the frame as it was, but a local flow's (translated to its backend).
        if out.action == XDP_PASS && out.verdict != Verdict::PassLocalBackend {
            assert_eq!(out.output, frame);
        }
        out
    }

    fn flow(&self, k: &FlowKey) -> Option<Flow> {
        self.m.state.conntrack.get(k).copied()
    }

    fn nat_port(&self, k: &FlowKey) -> u16 {
        port_from_wire(self.flow(k).unwrap().nat_port)
    }

    fn event(&self, e: Event) -> u64 {
        self.m.state.event(e)
    }
}

fn nat_key(backend: usize, nat: [u8; 4], port: u16, protocol: u8) -> NatKey {
    let b = backend_info(backend);
    NatKey {
        backend_addr: b.addr,
        lb_addr: addr_to_wire(nat),
        backend_port: b.port,
        nat_port: port_to_wire(port),
        protocol,
        _pad: [0; 3],
    }
}

#[test]
fn a_tcp_connection_from_syn_to_close() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);

    // SYN: a new flow, NATed to backend 0, sent back out (ifindex 1 = ingress).
    let syn = client_tcp(0, sport, SYN).payload(0).build();
    let out = r.send(&syn);
    assert_eq!((out.action, out.verdict), (XDP_TX, Verdict::ForwardTx));
    let flow = r.flow(&k).unwrap();
    assert_eq!(flow.flags, 0);
    assert_eq!(flow.backend_id, 0);
    assert_eq!(flow.last_seen_ns, START);
    assert_eq!(flow.nat_addr, addr_to_wire(LB));
    assert_eq!(flow.client_mac, CLIENT_MACS[0]);
    let port = r.nat_port(&k);
    assert!((NAT_MIN..=NAT_MAX).contains(&port));
    let nk = nat_key(0, LB, port, PROTO_TCP);
    assert_eq!(r.m.state.reverse[&nk].flow, k);
    assert_eq!(r.m.state.reverse[&nk].created_ns, START);
    assert_eq!(r.m.state.embryonic[0], k);
    assert_eq!(r.event(Event::NewFlow), 1);
    assert_eq!(r.event(Event::MidstreamPickup), 0);
    // The output: LB:port -> backend, the FIB's MACs, valid checksums, rest unchanged.
    let p = parse(&out.output).unwrap();
    assert_eq!(p.src_addr, addr_to_wire(LB));
    assert_eq!(p.dst_addr, addr_to_wire(BACKENDS[0].0));
    assert_eq!(p.src_port, port_to_wire(port));
    assert_eq!(p.dst_port, port_to_wire(8080));
    assert_eq!(&out.output[0..6], &BACKEND_MACS[0]);
    assert_eq!(&out.output[6..12], &LB_MAC);
    assert_eq!(ipv4_checksum_ok(&out.output), Some(true));
    assert_eq!(l4_checksum_ok(&out.output), Some(true));
    assert_eq!(out.output.len(), syn.len());
    // Only addresses, ports, the TTL (one less), checksums and MACs changed.
    assert_eq!(&out.output[12..22], &syn[12..22]);
    assert_eq!(out.output[22], syn[22] - 1);
    assert_eq!(out.output[23], syn[23]);
    assert_eq!(&out.output[34 + 4..34 + 16], &syn[34 + 4..34 + 16]);
    assert_eq!(&out.output[34 + 18..], &syn[34 + 18..]);
    let stats = r.m.state.vip_stats[&0];
    assert_eq!(
        (stats.packets, stats.bytes, stats.new_flows),
        (1, syn.len() as u64, 1)
    );
    assert_eq!(r.m.state.backend_stats[&0].new_flows, 1);

    // SYN|ACK from the backend: VIP -> client, to the FIB's MAC for .50.
    r.now += 100;
    let reply = backend_tcp(0, LB, port, SYN_ACK).build();
    let out = r.send(&reply);
    assert_eq!((out.action, out.verdict), (XDP_TX, Verdict::ReplyTx));
    let p = parse(&out.output).unwrap();
    assert_eq!(p.src_addr, addr_to_wire(VIP));
    assert_eq!(p.src_port, port_to_wire(VIP_TCP_PORT));
    assert_eq!(p.dst_addr, addr_to_wire(CLIENTS[0]));
    assert_eq!(p.dst_port, port_to_wire(sport));
    assert_eq!(&out.output[0..6], &CLIENT_MACS[0]);
    assert_eq!(ipv4_checksum_ok(&out.output), Some(true));
    assert_eq!(l4_checksum_ok(&out.output), Some(true));
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_SEEN_REPLY);
    assert_eq!(r.flow(&k).unwrap().last_seen_ns, START + 100);
    // Replies do not count as VIP traffic.
    assert_eq!(r.m.state.vip_stats[&0].packets, 1);

    // ACK: established.
    r.now += 100;
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.flow(&k).unwrap().flags, EST);
    // Data within G: no write.
    r.now += G / 2;
    r.send(&client_tcp(0, sport, ACK | TCP_PSH).payload(100).build());
    assert_eq!(r.flow(&k).unwrap().last_seen_ns, START + 200);
    // After G: refreshed.
    r.now += G;
    r.send(&client_tcp(0, sport, ACK | TCP_PSH).payload(100).build());
    assert_eq!(r.flow(&k).unwrap().last_seen_ns, r.now);
    // FIN from the client, then the backend: closed.
    r.send(&client_tcp(0, sport, FIN_ACK).build());
    assert_eq!(r.flow(&k).unwrap().flags, EST | FLOW_FIN_CLIENT);
    r.send(&backend_tcp(0, LB, port, FIN_ACK).build());
    assert_eq!(
        r.flow(&k).unwrap().flags,
        EST | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND
    );
    let closed_at = r.now;
    // Still there at fin_linger + G, gone (replaced) just after.
    r.now = closed_at + 3 * G;
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.event(Event::ExpiredFlowReplaced), 0);
    assert_eq!(r.flow(&k).unwrap().last_seen_ns, closed_at + 3 * G);
    r.now += 3 * G + 1;
    let out = r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(out.verdict, Verdict::ForwardTx);
    assert_eq!(r.event(Event::ExpiredFlowReplaced), 1);
    assert_eq!(r.event(Event::MidstreamPickup), 1);
    assert_eq!(r.flow(&k).unwrap().flags, 0);
    assert_eq!(r.m.state.reverse.len(), 1);
    assert_eq!(r.m.state.conntrack.len(), 1);
}

#[test]
fn verdict_bytes_and_events_are_counted() {
    let mut r = Run::new(8);
    let arp = {
        let mut f = vec![0u8; 60];
        f[12] = 0x08;
        f[13] = 0x06;
        f
    };
    r.send(&arp);
    r.send(&arp[..20]);
    let c = r.m.state.verdict(Verdict::PassNonIpv4);
    assert_eq!((c.packets, c.bytes), (2, 80));
    let short = vec![0u8; 14];
    let out = r.send(&short);
    assert_eq!(out.verdict, Verdict::PassNonIpv4);
    let tcp_elsewhere = FrameSpec::tcp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2, SYN).build();
    assert_eq!(r.send(&tcp_elsewhere).verdict, Verdict::PassTcp);
    let udp_elsewhere = FrameSpec::udp([1, 1, 1, 1], 1, [2, 2, 2, 2], 2).build();
    assert_eq!(r.send(&udp_elsewhere).verdict, Verdict::PassUdp);
    assert_eq!(
        r.send(&FrameSpec::icmp([1, 1, 1, 1], VIP).build()).verdict,
        Verdict::PassIcmp
    );
    assert!(r.m.state.conntrack.is_empty());
}

#[test]
fn screening_of_vip_packets() {
    let mut r = Run::new(8);
    let disabled = FrameSpec::tcp(CLIENTS[0], 40000, DISABLED_VIP, VIP_TCP_PORT, 0xff)
        .options(4)
        .build();
    let out = r.send(&disabled);
    assert_eq!(
        (out.action, out.verdict),
        (XDP_PASS, Verdict::PassVipDisabled)
    );
    // Options before fragment before flags.
    let all = client_tcp(0, 40000, TCP_SYN | TCP_FIN)
        .options(4)
        .fragment(0x2000)
        .build();
    assert_eq!(r.send(&all).verdict, Verdict::DropVipIpOptions);
    let frag = client_tcp(0, 40000, TCP_SYN | TCP_FIN)
        .fragment(0x2000)
        .build();
    assert_eq!(r.send(&frag).verdict, Verdict::DropVipFragment);
    let flags = client_tcp(0, 40000, TCP_SYN | TCP_FIN).build();
    let out = r.send(&flags);
    assert_eq!(
        (out.action, out.verdict),
        (XDP_DROP, Verdict::DropInvalidTcpFlags)
    );
    let none = client_tcp(0, 40000, 0).build();
    assert_eq!(r.send(&none).verdict, Verdict::DropInvalidTcpFlags);
    // A later fragment is passed before anything.
    let later = client_tcp(0, 40000, SYN).fragment(0x0010).build();
    assert_eq!(r.send(&later).verdict, Verdict::PassFragment);
    // UDP has no flags to check.
    let udp = client_udp(0, 40000).build();
    assert!(matches!(
        r.send(&udp).verdict,
        Verdict::ForwardTx | Verdict::ForwardRedirect
    ));
    assert_eq!(r.m.state.conntrack.len(), 1);
}

#[test]
fn nat_port_traffic_that_is_not_a_flow() {
    let mut r = Run::new(8);
    // A backend to a live NAT port without an entry: dropped.
    let out = r.send(&backend_tcp(0, LB, NAT_MIN, SYN_ACK).build());
    assert_eq!(
        (out.action, out.verdict),
        (XDP_DROP, Verdict::DropReplyNoFlow)
    );
    // ... also to an earlier range, and also with invalid flags.
    let out = r.send(&backend_tcp(1, OLD_NAT, OLD_NAT_MAX, 0).build());
    assert_eq!(out.verdict, Verdict::DropReplyNoFlow);
    // A stranger to a NAT port, or a backend to a port outside the ranges: passed.
    let stranger = FrameSpec::tcp([10, 9, 9, 9], 8080, LB, NAT_MIN, SYN_ACK).build();
    assert_eq!(r.send(&stranger).verdict, Verdict::PassTcp);
    let outside = backend_tcp(0, LB, NAT_MAX + 1, SYN_ACK).build();
    assert_eq!(r.send(&outside).verdict, Verdict::PassTcp);
    let old_outside = backend_udp(0, OLD_NAT, OLD_NAT_MIN - 1).build();
    assert_eq!(r.send(&old_outside).verdict, Verdict::PassUdp);
}

#[test]
fn replies_are_screened_and_checked_against_their_flow() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);
    r.send(&client_tcp(0, sport, SYN).build());
    let port = r.nat_port(&k);
    for (spec, verdict) in [
        (
            backend_tcp(0, LB, port, SYN_ACK).options(8),
            Verdict::DropVipIpOptions,
        ),
        (
            backend_tcp(0, LB, port, SYN_ACK).fragment(0x2000),
            Verdict::DropVipFragment,
        ),
        (
            backend_tcp(0, LB, port, TCP_FIN),
            Verdict::DropInvalidTcpFlags,
        ),
    ] {
        let out = r.send(&spec.build());
        assert_eq!((out.action, out.verdict), (XDP_DROP, verdict));
    }
    assert_eq!(r.flow(&k).unwrap().flags, 0);

    // A stale reverse entry: the flow names another port.
    let nk = nat_key(0, LB, port, PROTO_TCP);
    let other_port = if port == NAT_MIN { NAT_MAX } else { NAT_MIN };
    let mut stale = r.m.state.reverse[&nk];
    stale.created_ns = 0;
    r.m.state
        .reverse
        .insert(nat_key(0, LB, other_port, PROTO_TCP), stale);
    let out = r.send(&backend_tcp(0, LB, other_port, SYN_ACK).build());
    assert_eq!(out.verdict, Verdict::DropReplyNoFlow);
    r.m.state
        .reverse
        .remove(&nat_key(0, LB, other_port, PROTO_TCP));

    // A reply for an expired flow: forgotten, dropped.
    r.now += 5 * G + G + 1;
    let out = r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    assert_eq!(out.verdict, Verdict::DropReplyNoFlow);
    assert_eq!(r.event(Event::ExpiredFlowReplaced), 1);
    assert!(r.m.state.conntrack.is_empty() && r.m.state.reverse.is_empty());
}

#[test]
fn a_lost_forward_entry_is_rebuilt_by_the_reply() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);
    r.send(&client_tcp(0, sport, SYN).build());
    let port = r.nat_port(&k);
    r.m.state.conntrack.clear();
    r.now += 7;
    let out = r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    assert_eq!(out.verdict, Verdict::ReplyTx);
    assert_eq!(r.event(Event::ForwardRecovered), 1);
    let flow = r.flow(&k).unwrap();
    assert_eq!(flow.flags, FLOW_SEEN_REPLY);
    assert_eq!(flow.client_mac, [0; 6]);
    assert_eq!(flow.last_seen_ns, r.now);
    assert_eq!(flow.nat_port, port_to_wire(port));
    // The rebuilt flow was recorded in the queue (slot 1: the SYN took slot 0).
    assert_eq!(r.m.state.embryonic[1], k);
    // A reverse entry whose backend does not match the packet's source: dropped.
    r.m.state.conntrack.clear();
    r.m.state
        .reverse
        .get_mut(&nat_key(0, LB, port, PROTO_TCP))
        .unwrap()
        .backend_id = 1;
    let out = r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    assert_eq!(out.verdict, Verdict::DropReplyNoFlow);
    // The client finds its own reverse entry when it claims a port: kept as it is.
    r.m.state
        .reverse
        .get_mut(&nat_key(0, LB, port, PROTO_TCP))
        .unwrap()
        .backend_id = 0;
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.event(Event::ForwardRecovered), 2);
    assert_eq!(r.nat_port(&k), port, "hash-derived: the same port again");
}

#[test]
fn a_lost_reverse_entry_is_rebuilt_by_a_refreshing_client_packet() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);
    r.send(&client_tcp(0, sport, SYN).build());
    r.m.state.reverse.clear();
    // A retransmitted SYN within G refreshes nothing: not rebuilt.
    r.send(&client_tcp(0, sport, SYN).build());
    assert!(r.m.state.reverse.is_empty());
    r.now += G + 1;
    r.send(&client_tcp(0, sport, SYN).build());
    assert_eq!(r.event(Event::ReverseRecovered), 1);
    let nk = nat_key(0, LB, r.nat_port(&k), PROTO_TCP);
    assert_eq!(r.m.state.reverse[&nk].flow, k);
    assert_eq!(r.m.state.reverse[&nk].created_ns, r.now);
}

#[test]
fn replies_to_clients_without_a_neighbour_use_the_learned_mac() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 1, PROTO_TCP, 0);
    let k = key(1, sport, PROTO_TCP);
    r.send(&client_tcp(1, sport, SYN).build());
    let port = r.nat_port(&k);
    let reply = backend_tcp(0, LB, port, SYN_ACK).build();
    let out = r.send(&reply);
    assert_eq!((out.action, out.verdict), (XDP_TX, Verdict::ReplyTx));
    assert_eq!(&out.output[0..6], &CLIENT_MACS[1]);
    assert_eq!(&out.output[6..12], &reply[0..6]);
    assert_eq!(r.event(Event::ReplyToLearnedMac), 1);
    // Rebuilt from the reverse table, the flow has no learned MAC: dropped.
    r.m.state.conntrack.clear();
    let out = r.send(&reply);
    assert_eq!(
        (out.action, out.verdict),
        (XDP_DROP, Verdict::DropNoNeighbour)
    );
    // A client via an interface outside TX_PORTS.
    let sport = port_to(&r.m, 2, PROTO_TCP, 0);
    r.send(&client_tcp(2, sport, SYN).build());
    let port = r.nat_port(&key(2, sport, PROTO_TCP));
    let out = r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    assert_eq!((out.action, out.verdict), (XDP_DROP, Verdict::DropNoTxPort));
}

#[test]
fn redirects_tags_and_fib_failures() {
    let mut r = Run::new(8);
    // Backend 1 is behind ifindex 2, a TX port: redirect.
    let sport = port_to(&r.m, 0, PROTO_TCP, 1);
    let out = r.send(&client_tcp(0, sport, SYN).build());
    assert_eq!(
        (out.action, out.verdict),
        (XDP_REDIRECT, Verdict::ForwardRedirect)
    );
    assert_eq!(&out.output[0..6], &BACKEND_MACS[1]);
    // Tagged: XDP_TX whatever the egress, tag kept.
    let sport = (41000..42000)
        .find(|p| maglev_backend(&r.m, &key(0, *p, PROTO_TCP)) == 1)
        .unwrap();
    let tagged = client_tcp(0, sport, SYN).vlan(42).build();
    let out = r.send(&tagged);
    assert_eq!((out.action, out.verdict), (XDP_TX, Verdict::ForwardTx));
    assert_eq!(&out.output[12..16], &tagged[12..16]);
    assert_eq!(l4_checksum_ok(&out.output), Some(true));
    // The clock override.
    r.m.config.settings.clock_ns = 77 * G;
    let sport = port_to(&r.m, 0, PROTO_UDP, 0);
    let out = r.send(&client_udp(0, sport).build());
    assert_eq!(out.verdict, Verdict::ForwardTx);
    assert_eq!(
        r.flow(&key(0, sport, PROTO_UDP)).unwrap().last_seen_ns,
        77 * G
    );
    // A FIB that is a struct.
    struct Unreachable;
    impl ha_model::Fib for Unreachable {
        fn lookup(
            &self,
            _: u32,
            _: std::net::Ipv4Addr,
            _: std::net::Ipv4Addr,
            _: u16,
        ) -> ha_model::FibAnswer {
            ha_model::FibAnswer::Failure
        }
    }
    let out =
        r.m.process(&client_udp(0, sport).build(), INGRESS, 0, &Unreachable);
    assert_eq!(out.verdict, Verdict::DropFibFailure);
    // A FIB that fails for everything.
    let out =
        r.m.process(&client_udp(0, sport).build(), INGRESS, 0, &|_, _, _, _| {
            ha_model::FibAnswer::Failure
        });
    assert_eq!(
        (out.action, out.verdict),
        (XDP_DROP, Verdict::DropFibFailure)
    );
    let out =
        r.m.process(&client_udp(0, sport).build(), INGRESS, 0, &|_, _, _, _| {
            ha_model::FibAnswer::NoNeighbour
        });
    assert_eq!(
        out.verdict,
        Verdict::DropNoNeighbour,
        "no learned MAC towards a backend"
    );
}

#[test]
fn local_backends_are_translated_both_ways() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 2);
    let k = key(0, sport, PROTO_TCP);
    let syn = client_tcp(0, sport, SYN).build();
    let out = r.send(&syn);
    assert_eq!(
        (out.action, out.verdict),
        (XDP_PASS, Verdict::PassLocalBackend)
    );
    // Passed up to the backend's own address and port, from the client, checksums right.
    let (local_addr, local_port) = BACKENDS[2];
    let expected = FrameSpec::tcp(CLIENTS[0], sport, local_addr, local_port, SYN)
        .macs(CLIENT_MACS[0], LB_MAC)
        .build();
    assert_eq!(out.output, expected);
    assert_eq!(
        (ipv4_checksum_ok(&out.output), l4_checksum_ok(&out.output)),
        (Some(true), Some(true))
    );
    // One flow table owns the translation: the flow's NAT source is the client, and its
    // reverse entry is keyed by the tuple of the listener's replies.
    let flow = r.flow(&k).unwrap();
    assert_eq!(flow.flags, FLOW_LOCAL);
    assert_eq!((flow.nat_addr, flow.nat_port), (k.src_addr, k.src_port));
    assert_eq!(r.m.state.reverse.len(), 1);
    assert_eq!(r.m.state.embryonic[0], k);
    assert_eq!(r.m.state.backend_stats[&2].new_flows, 1);
    // The listener's SYN-ACK leaves through the egress program from the VIP.
    let synack = FrameSpec::tcp(local_addr, local_port, CLIENTS[0], sport, SYN_ACK)
        .macs(LB_MAC, CLIENT_MACS[0])
        .build();
    let egress = r.m.egress(&synack, r.now);
    assert_eq!(egress.verdict, ha_common::EgressVerdict::Translated);
    let translated = FrameSpec::tcp(VIP, VIP_TCP_PORT, CLIENTS[0], sport, SYN_ACK)
        .macs(LB_MAC, CLIENT_MACS[0])
        .build();
    assert_eq!(egress.output, translated);
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_LOCAL | FLOW_SEEN_REPLY);
    // The client's ACK after the answer: established, as a NATed flow is.
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_LOCAL | EST);
    assert_eq!(r.m.state.backend_stats[&2].packets, 2);
    // Something else leaving the host is untouched.
    let other = FrameSpec::tcp(local_addr, local_port, CLIENTS[1], sport, ACK)
        .macs(LB_MAC, CLIENT_MACS[1])
        .build();
    let egress = r.m.egress(&other, r.now);
    assert_eq!(egress.verdict, ha_common::EgressVerdict::Pass);
    assert_eq!(egress.output, other);
    // A local flow whose backend record went missing: forgotten, and (with the Maglev
    // slot pointing at that missing record too) no backend for a new flow.
    r.m.config.backends.truncate(2);
    let out = r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(out.verdict, Verdict::DropNoBackend);
    assert_eq!(r.event(Event::MovedFromDownBackend), 1);
}

#[test]
fn stale_and_restarted_flows() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);
    r.send(&client_tcp(0, sport, SYN).build());
    let port = r.nat_port(&k);
    r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.flow(&k).unwrap().flags, EST);
    // A bare SYN on an established flow starts over.
    r.send(&client_tcp(0, sport, SYN).build());
    assert_eq!(r.event(Event::SynRestartedFlow), 1);
    assert_eq!(r.flow(&k).unwrap().flags, 0);
    assert_eq!(r.event(Event::NewFlow), 2);
    // A bare SYN on a new or replied flow does not.
    r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    r.send(&client_tcp(0, sport, SYN).build());
    assert_eq!(r.event(Event::SynRestartedFlow), 1);
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_SEEN_REPLY);
    // A FIN before assured: also restarted by a SYN.
    r.send(&client_tcp(0, sport, FIN_ACK).build());
    assert_eq!(
        r.flow(&k).unwrap().flags,
        FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_FIN_CLIENT
    );
    r.send(&client_tcp(0, sport, SYN).build());
    assert_eq!(r.event(Event::SynRestartedFlow), 2);
    // A backend flagged DOWN: the flow moves (here to the same backend, by the same hash).
    r.m.config.backends[0].flags |= BACKEND_FLAG_DOWN;
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.event(Event::MovedFromDownBackend), 1);
    assert_eq!(r.event(Event::MidstreamPickup), 1);
    r.m.config.backends[0].flags = 0;
    // Backend record with addr 0: the flow is forgotten as from a down backend, and no
    // new flow can pick it.
    r.m.config.backends[0].addr = 0;
    let out = r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(out.verdict, Verdict::DropNoBackend);
    assert_eq!(r.event(Event::MovedFromDownBackend), 2);
    r.m.state.conntrack.clear();
    let out = r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(out.verdict, Verdict::DropNoBackend);
    r.m.config.maglev = vec![NO_BACKEND; 12];
    let out = r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(out.verdict, Verdict::DropNoBackend);
}

#[test]
fn rst_and_first_packets() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let k = key(0, sport, PROTO_TCP);
    // An RST first packet: created closed, forwarded.
    let out = r.send(&client_tcp(0, sport, TCP_RST).build());
    assert_eq!(out.verdict, Verdict::ForwardTx);
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_RESET);
    assert_eq!(r.event(Event::MidstreamPickup), 1);
    assert_eq!(r.event(Event::FlowReset), 1, "born closed");
    // FIN|ACK first: FIN_CLIENT.
    let sport2 = port_to(&r.m, 1, PROTO_TCP, 0);
    r.send(&client_tcp(1, sport2, FIN_ACK).build());
    assert_eq!(
        r.flow(&key(1, sport2, PROTO_TCP)).unwrap().flags,
        FLOW_FIN_CLIENT
    );
    assert_eq!(r.event(Event::MidstreamPickup), 2);
    // The backend's RST on an established flow closes it.
    let port = r.nat_port(&k);
    r.m.state.conntrack.get_mut(&k).unwrap().flags = EST;
    r.send(&backend_tcp(0, LB, port, TCP_RST | ACK).build());
    assert_eq!(r.flow(&k).unwrap().flags, EST | FLOW_RESET);
}

#[test]
fn udp_flows() {
    let mut r = Run::new(8);
    let sport = port_to(&r.m, 0, PROTO_UDP, 0);
    let k = key(0, sport, PROTO_UDP);
    let out = r.send(&client_udp(0, sport).zero_udp_checksum().payload(12).build());
    assert_eq!(out.verdict, Verdict::ForwardTx);
    assert_eq!(&out.output[40..42], &[0, 0], "no checksum stays none");
    assert_eq!(r.m.state.vip_stats[&1].new_flows, 1);
    let port = r.nat_port(&k);
    r.send(&backend_udp(0, LB, port).build());
    assert_eq!(r.flow(&k).unwrap().flags, FLOW_SEEN_REPLY);
    r.send(&client_udp(0, sport).build());
    assert_eq!(r.flow(&k).unwrap().flags, EST);
    // Established UDP: 8 s idle.
    let t = r.flow(&k).unwrap().last_seen_ns;
    r.now = t + 9 * G + 1;
    r.send(&client_udp(0, sport).build());
    assert_eq!(r.event(Event::ExpiredFlowReplaced), 1);
    assert_eq!(r.flow(&k).unwrap().flags, 0);
}

#[test]
fn table_full_and_nat_exhaustion() {
    // Capacity 1: the second flow cannot be inserted; its claimed port is given back.
    let mut r = Run::new(1);
    r.m.config.settings.embryonic_slots = 0;
    let s0 = port_to(&r.m, 0, PROTO_TCP, 0);
    r.send(&client_tcp(0, s0, SYN).build());
    let k0 = key(0, s0, PROTO_TCP);
    let port = r.nat_port(&k0);
    r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    r.send(&client_tcp(0, s0, ACK).build());
    let s1 = port_to(&r.m, 2, PROTO_TCP, 1);
    let out = r.send(&client_tcp(2, s1, SYN).build());
    // The reverse table is full too: no port.
    assert_eq!(out.verdict, Verdict::DropNatExhausted);
    assert_eq!(r.event(Event::NatPortCollision), 8);
    // A local flow needs no NAT port, but its reverse entry (its replies' tuple) finds
    // no room either.
    let s2 = port_to(&r.m, 0, PROTO_TCP, 2);
    let out = r.send(&client_tcp(0, s2, SYN).build());
    assert_eq!(out.verdict, Verdict::DropNatExhausted);

    // Capacity 2 with a local flow in (the reverse table with room for three, as the agent
    // gives it a margin): the port is claimed, the flow insert fails, the claim is undone.
    let mut r = Run::new(2);
    r.m.capacity.reverse = 3;
    r.m.config.settings.embryonic_slots = 0;
    let s2 = port_to(&r.m, 0, PROTO_TCP, 2);
    r.send(&client_tcp(0, s2, SYN).build());
    r.send(&client_tcp(0, s2, ACK).build());
    r.send(&client_tcp(0, s0, SYN).build());
    let port = r.nat_port(&k0);
    r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    r.send(&client_tcp(0, s0, ACK).build());
    assert_eq!(r.m.state.conntrack.len(), 2);
    let out = r.send(&client_tcp(2, s1, SYN).build());
    assert_eq!(out.verdict, Verdict::DropTableFull);
    assert_eq!(r.m.state.reverse.len(), 2);
    assert_eq!(r.m.state.conntrack.len(), 2);

    // Four NAT ports held by established flows to backend 0: exhausted for backend 0 only.
    let mut r = Run::new(16);
    let mut established = 0;
    for sport in 40000..41000 {
        let k = key(0, sport, PROTO_TCP);
        if maglev_backend(&r.m, &k) != 0 {
            continue;
        }
        let out = r.send(&client_tcp(0, sport, SYN).build());
        if out.verdict == Verdict::DropNatExhausted {
            continue;
        }
        if let Some(flow) = r.flow(&k) {
            let port = port_from_wire(flow.nat_port);
            r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
            r.send(&client_tcp(0, sport, ACK).build());
            established += 1;
        }
        if established == 4 {
            break;
        }
    }
    assert_eq!(established, 4);
    assert_eq!(r.m.state.reverse.len(), 4);
    let sport = (41000..42000)
        .find(|p| maglev_backend(&r.m, &key(1, *p, PROTO_TCP)) == 0)
        .unwrap();
    let out = r.send(&client_tcp(1, sport, SYN).build());
    assert_eq!(out.verdict, Verdict::DropNatExhausted);
    let sport = port_to(&r.m, 1, PROTO_TCP, 1);
    let out = r.send(&client_tcp(1, sport, SYN).build());
    assert_eq!(
        out.verdict,
        Verdict::ForwardRedirect,
        "backend 1's ports are free"
    );
}

#[test]
fn the_sweep_expires_recovers_and_frees() {
    let mut r = Run::new(8);
    let s0 = port_to(&r.m, 0, PROTO_TCP, 0);
    let k0 = key(0, s0, PROTO_TCP);
    r.send(&client_tcp(0, s0, SYN).build());
    let s1 = port_to(&r.m, 1, PROTO_TCP, 2);
    r.send(&client_tcp(1, s1, SYN).build());
    // Damage: a lost reverse entry, and an orphan.
    r.m.state.reverse.clear();
    let orphan = nat_key(1, LB, NAT_MAX, PROTO_TCP);
    r.m.state.reverse.insert(
        orphan,
        ha_common::NatEntry {
            flow: key(2, 1, PROTO_TCP),
            backend_id: 1,
            _pad: 0,
            created_ns: r.now,
        },
    );
    let report = r.m.sweep(r.now + G);
    assert_eq!(
        (
            report.live,
            report.expired,
            report.reverse_recovered,
            report.orphans_freed
        ),
        (2, 0, 2, 0)
    );
    let port = r.nat_port(&k0);
    assert_eq!(
        r.m.state.reverse[&nat_key(0, LB, port, PROTO_TCP)].created_ns,
        r.now + G
    );
    let report = r.m.sweep(r.now + G + 1);
    assert_eq!(report.orphans_freed, 1);
    // The NATed flow's entry and the local flow's (keyed by its client).
    assert_eq!(r.m.state.reverse.len(), 2);
    // Expired: both (syn timeout 5 s).
    let report = r.m.sweep(r.now + 6 * G + 1);
    assert_eq!((report.live, report.expired), (0, 2));
    assert!(r.m.state.conntrack.is_empty() && r.m.state.reverse.is_empty());
    // The sweep counts no data-path events.
    assert_eq!(r.event(Event::ExpiredFlowReplaced), 0);
}

#[test]
fn a_syn_flood_in_a_full_table_evicts_unanswered_flows_and_never_established_ones() {
    // Room for 4 flows; one of them established first.
    let mut r = Run::new(4);
    let sport = port_to(&r.m, 0, PROTO_TCP, 0);
    let established = key(0, sport, PROTO_TCP);
    r.send(&client_tcp(0, sport, SYN).build());
    let port = r.nat_port(&established);
    r.send(&backend_tcp(0, LB, port, SYN_ACK).build());
    r.send(&client_tcp(0, sport, ACK).build());
    assert_eq!(r.flow(&established).unwrap().flags, EST);
    // Twenty unanswered SYNs from other ports: the table fills and the oldest
    // unanswered flows make room, one at a time.
    for sport in 41000..41020 {
        let out = r.send(&client_tcp(0, sport, SYN).build());
        assert_ne!(out.verdict, Verdict::DropTableFull, "port {sport}");
        assert!(r.m.state.conntrack.len() <= 4);
        assert!(r.flow(&established).is_some(), "the established flow stays");
    }
    assert!(r.event(Event::EmbryonicEvicted) > 0);
}
