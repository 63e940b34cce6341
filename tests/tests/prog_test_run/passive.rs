//! Passive health (docs/data-path.md, "Passive health"): a backend that
//! refuses a new flow is suspect at once, new flows go around it, and the
//! refused SYN's RST is redispatched: dropped once, so that the client's
//! retransmission reaches another backend.

use ha_common::{
    PASSIVE_REASON_ICMP_UNREACHABLE, PASSIVE_REASON_RST_TO_SYN, PassiveEvent, SUSPECT_REHASHES,
    SUSPECT_TTL_NS,
};

use super::*;

/// What a TCP answers a SYN with when nothing listens: RST with ACK.
const RST_ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: true,
};

impl World {
    /// The flow key of a client port to the TCP VIP.
    fn tcp_key(&self, client_port: u16) -> FlowKey {
        let mut key = self.flow(self.tcp_vip, 6443, PROTO_TCP);
        key.src_port = port_to_wire(client_port);
        key
    }

    fn id_of(&self, name: &str) -> u32 {
        self.dataplane
            .backend_id_of(self.lab.host(name).addr, 6443)
            .unwrap()
    }

    fn name_of(&self, id: u32) -> &'static str {
        APIS.iter().find(|n| self.id_of(n) == id).unwrap()
    }

    /// The backend id of the TCP VIP's table slot for `hash`.
    fn slot(&self, hash: u32) -> u32 {
        let table = self
            .dataplane
            .active_table(self.tcp_vip, 6443, PROTO_TCP)
            .unwrap();
        table[(hash % TABLE_SIZE) as usize]
    }

    /// Where a new flow from `client_port` goes while `suspects` are
    /// suspect, computed from the agent's table and the shared hashes: its
    /// slot's backend, else the first rehashed slot's that is another and
    /// not suspect, else its slot's (fail open).
    fn expected(&self, client_port: u16, suspects: &[u32]) -> u32 {
        let hash = hash::flow_hash(&self.tcp_key(client_port));
        let primary = self.slot(hash);
        if !suspects.contains(&primary) {
            return primary;
        }
        (1..=SUSPECT_REHASHES)
            .map(|attempt| self.slot(hash::rehash(hash, attempt)))
            .find(|id| *id != primary && !suspects.contains(id))
            .unwrap_or(primary)
    }

    /// A client port (from `from` on) whose slot names backend `id`.
    fn port_to(&self, id: u32, from: u16) -> u16 {
        (from..)
            .find(|p| self.slot(hash::flow_hash(&self.tcp_key(*p))) == id)
            .unwrap()
    }

    fn syn_from(&self, client_port: u16) -> (u32, Vec<u8>) {
        let mut frame = self.client_frame(self.tcp_vip, 6443, SYN);
        frame.sport = client_port;
        self.run(&frame.build())
    }

    /// A segment from backend `name` to NAT port `nat_port`.
    fn backend_sends(&self, name: &str, nat_port: u16, l4: L4) -> (u32, Vec<u8>) {
        let b = self.lab.host(name);
        let frame = Frame {
            src_mac: b.mac,
            dst_mac: self.lb_mac,
            vlan: None,
            src: b.addr,
            dst: self.lb,
            sport: 6443,
            dport: nat_port,
            l4,
            payload: b"",
        };
        self.run(&frame.build())
    }

    fn has_flow(&self, key: &FlowKey) -> bool {
        self.dataplane
            .flows()
            .unwrap()
            .iter()
            .any(|(k, _)| k == key)
    }

    fn has_reverse(&self, key: &FlowKey) -> bool {
        self.dataplane
            .reverse_entries()
            .unwrap()
            .iter()
            .any(|(_, e)| e.flow == *key)
    }

    fn event_count(&self, event: Event) -> u64 {
        self.dataplane.event(event).unwrap()
    }
}

/// The backend a NATed frame went to, by name.
fn sent_to(w: &World, frame: &[u8]) -> (&'static str, u16) {
    let (addr, port) = nat_target(frame);
    let name = APIS.iter().find(|n| w.lab.host(n).addr == addr).unwrap();
    (name, port)
}

#[test]
fn a_refused_syn_is_redispatched_once_to_another_backend_and_the_second_refusal_reaches_the_client()
{
    let mut w = world();
    // A client port whose flow has somewhere else to go once its backend is
    // suspect (the lab's addresses change the hashes from run to run).
    let port = (CLIENT_PORT + 100..)
        .find(|p| {
            let primary = w.expected(*p, &[]);
            w.expected(*p, &[primary]) != primary
        })
        .unwrap();
    let key = w.tcp_key(port);
    let first = w.expected(port, &[]);
    let (verdict, out) = w.syn_from(port);
    assert_eq!(verdict, XDP_TX);
    let (name, nat_port) = sent_to(&w, &out);
    assert_eq!(w.id_of(name), first, "the slot's backend");

    // Its RST+ACK to the SYN: dropped, the flow and its NAT port gone, the
    // backend suspect, the agent told once, the key recorded.
    let before = w.dataplane.verdicts().unwrap();
    assert_eq!(w.backend_sends(name, nat_port, RST_ACK).0, XDP_DROP);
    assert_eq!(w.delta(Verdict::DropRedispatched, &before), 1);
    assert!(!w.has_flow(&key), "the flow is forgotten");
    assert!(!w.has_reverse(&key), "its NAT port is free");
    assert_eq!(w.dataplane.suspect_since(first).unwrap(), T0);
    assert_eq!(
        w.dataplane.take_passive_events().unwrap(),
        vec![PassiveEvent {
            backend_id: first,
            reason: PASSIVE_REASON_RST_TO_SYN,
            at_ns: T0,
        }]
    );
    assert_eq!(w.dataplane.redispatched_flows().unwrap(), vec![(key, T0)]);
    assert_eq!(w.event_count(Event::Redispatched), 1);
    assert_eq!(w.event_count(Event::BackendSuspected), 1);

    // The client's retransmission, a second later: a new flow, to another backend.
    w.dataplane.set_clock(T0 + SECOND).unwrap();
    let second = w.expected(port, &[first]);
    assert_ne!(second, first);
    let (verdict, out) = w.syn_from(port);
    assert_eq!(verdict, XDP_TX);
    let (name2, nat_port2) = sent_to(&w, &out);
    assert_eq!(
        w.id_of(name2),
        second,
        "the first rehashed slot not suspect"
    );
    assert_eq!(w.event_count(Event::SuspectSkipped), 1);

    // It refuses too: this RST reaches the client, translated (one redispatch per key).
    let before = w.dataplane.verdicts().unwrap();
    let (verdict, out) = w.backend_sends(name2, nat_port2, RST_ACK);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(w.delta(Verdict::ReplyTx, &before), 1);
    let to_client = Frame {
        src_mac: w.lb_mac,
        dst_mac: w.client_mac,
        vlan: None,
        src: w.tcp_vip,
        dst: w.client,
        sport: 6443,
        dport: port,
        l4: RST_ACK,
        payload: b"",
    };
    assert_eq!(out, to_client.forwarded(), "the RST, from the VIP");
    assert_eq!(w.event_count(Event::RedispatchLimit), 1);
    assert_eq!(w.event_count(Event::Redispatched), 1);
    assert_eq!(
        w.dataplane.suspect_since(second).unwrap(),
        T0 + SECOND,
        "the second backend is suspect too"
    );
    assert_eq!(w.dataplane.take_passive_events().unwrap().len(), 1);
    assert!(
        w.has_flow(&key),
        "the passed RST closes the flow as any RST"
    );
}

#[test]
fn suspects_get_no_new_flows_until_their_ttl_ends_and_keep_their_flows_and_all_suspect_fails_open()
{
    let mut w = world();
    let a = w.id_of("api1");
    // An established flow to api1, before it is suspect.
    let established = w.port_to(a, 42000);
    Conversation::new(&w, established).handshake();
    w.dataplane.set_suspect_since(a, T0).unwrap();

    // The established flow keeps its backend.
    let mut ack = w.client_frame(w.tcp_vip, 6443, ACK);
    ack.sport = established;
    let (verdict, out) = w.run(&ack.build());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        sent_to(&w, &out).0,
        "api1",
        "conntrack keeps existing flows"
    );

    // A new flow whose slot names api1 goes elsewhere; one whose slot
    // names another backend keeps it.
    let steered = w.port_to(a, 43000);
    let (_, out) = w.syn_from(steered);
    let expected = w.expected(steered, &[a]);
    assert_ne!(expected, a);
    assert_eq!(sent_to(&w, &out).0, w.name_of(expected));
    assert_eq!(w.event_count(Event::SuspectSkipped), 1);
    let b = w.id_of("api2");
    let other = w.port_to(b, 44000);
    let (_, out) = w.syn_from(other);
    assert_eq!(
        sent_to(&w, &out).0,
        "api2",
        "a healthy slot keeps its flows"
    );
    assert_eq!(w.event_count(Event::SuspectSkipped), 1);

    // The suspect flag ends after SUSPECT_TTL_NS without the agent's word.
    w.dataplane.set_clock(T0 + SUSPECT_TTL_NS).unwrap();
    let after_ttl = w.port_to(a, 45000);
    let (_, out) = w.syn_from(after_ttl);
    assert_eq!(sent_to(&w, &out).0, "api1", "TTL over: its slot again");

    // Every backend suspect: the slot's own backend all the same (fail open).
    let now = T0 + SUSPECT_TTL_NS;
    for name in APIS {
        w.dataplane.set_suspect_since(w.id_of(name), now).unwrap();
    }
    let open = w.port_to(a, 46000);
    let (verdict, out) = w.syn_from(open);
    assert_eq!(verdict, XDP_TX);
    let nat_port = sent_to(&w, &out).1;
    assert_eq!(sent_to(&w, &out).0, "api1");
    assert_eq!(w.event_count(Event::SuspectFailOpen), 1);
    // Its refusal then reaches the client: nowhere else to go.
    let (verdict, _) = w.backend_sends("api1", nat_port, RST_ACK);
    assert_eq!(verdict, XDP_TX, "no other backend eligible: the RST passes");
    assert_eq!(w.event_count(Event::RedispatchNoAlternative), 1);
    assert_eq!(w.event_count(Event::Redispatched), 0);
    assert!(
        w.dataplane.take_passive_events().unwrap().is_empty(),
        "already suspect: the agent is not told again"
    );
}

#[test]
fn only_a_refused_syn_suspects_a_backend_not_a_bare_rst_or_an_answered_flow() {
    let w = world();
    let a = w.id_of("api1");
    // A bare RST (the answer to a segment with ACK: a picked-up flow the
    // backend does not know) on a new flow: passed, nobody suspect.
    let port = w.port_to(a, 47000);
    let (_, out) = w.syn_from(port);
    let nat_port = sent_to(&w, &out).1;
    assert_eq!(w.backend_sends("api1", nat_port, RST).0, XDP_TX);
    // RST+ACK on an answered flow (SYN+ACK seen): a reset, not a refusal.
    let answered = w.port_to(a, 48000);
    let c = Conversation::new(&w, answered);
    c.handshake();
    assert_eq!(c.backend(RST_ACK).0, XDP_TX);
    assert_eq!(w.dataplane.suspect_since(a).unwrap(), 0);
    assert_eq!(w.event_count(Event::BackendSuspected), 0);
}

/// An ICMP destination unreachable from api1 about the segment the NAT
/// port `nat_port` sent it (`l4`), quoting its IPv4 header and 20 bytes.
fn unreachable(
    w: &World,
    nat_port: u16,
    header: etherparse::icmpv4::DestUnreachableHeader,
    l4: L4,
) -> Vec<u8> {
    let api1 = w.lab.host("api1");
    let sent = Frame {
        src_mac: w.lb_mac,
        dst_mac: api1.mac,
        vlan: None,
        src: w.lb,
        dst: api1.addr,
        sport: nat_port,
        dport: 6443,
        l4,
        payload: b"",
    };
    icmp_frame(
        api1.mac,
        w.lb_mac,
        api1.addr,
        w.lb,
        64,
        false,
        etherparse::Icmpv4Type::DestinationUnreachable(header),
        &sent.build()[14..14 + 40],
    )
}

#[test]
fn an_icmp_unreachable_about_a_new_flows_packet_suspects_its_backend() {
    let mut w = world();
    let a = w.id_of("api1");
    // An answered flow: an unreachable about it is translated, nobody suspect.
    let c = Conversation::new(&w, w.port_to(a, 49000));
    c.handshake();
    let nat_port = c.nat_port.load(std::sync::atomic::Ordering::Relaxed);
    let before = w.dataplane.verdicts().unwrap();
    w.run(&unreachable(
        &w,
        nat_port,
        etherparse::icmpv4::DestUnreachableHeader::Host,
        ACK,
    ));
    assert_eq!(w.delta(Verdict::IcmpReplyTx, &before), 1);
    assert_eq!(w.dataplane.suspect_since(a).unwrap(), 0);

    // A new flow: fragmentation needed is a path MTU, not a refusal.
    let (_, out) = w.syn_from(w.port_to(a, 50000));
    let nat_port = sent_to(&w, &out).1;
    let frag =
        etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 };
    w.run(&unreachable(&w, nat_port, frag, SYN));
    assert_eq!(w.dataplane.suspect_since(a).unwrap(), 0);
    // Port unreachable about its SYN: translated to the client, and api1 suspect.
    let before = w.dataplane.verdicts().unwrap();
    let (verdict, _) = w.run(&unreachable(
        &w,
        nat_port,
        etherparse::icmpv4::DestUnreachableHeader::Port,
        SYN,
    ));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(w.delta(Verdict::IcmpReplyTx, &before), 1);
    assert_eq!(w.dataplane.suspect_since(a).unwrap(), T0);
    assert_eq!(
        w.dataplane.take_passive_events().unwrap(),
        vec![PassiveEvent {
            backend_id: a,
            reason: PASSIVE_REASON_ICMP_UNREACHABLE,
            at_ns: T0,
        }]
    );
    // The next new flow of its slot goes elsewhere.
    let (_, out) = w.syn_from(w.port_to(a, 51000));
    assert_ne!(sent_to(&w, &out).0, "api1");
}
