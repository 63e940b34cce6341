//! Local backends: a flow to this host's backend is translated by XDP to the
//! backend's address and port (client source kept) and passed up; the tc
//! egress program translates the listener's replies back to the VIP, found
//! by the flow's reverse entry, and feeds the backend's side of the flow's
//! state machine. Expected frames are etherparse's (own checksums).

use ha_common::{
    EgressVerdict, Event, FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_LOCAL, FLOW_RESET,
    FLOW_SEEN_REPLY,
};

use super::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

impl World {
    /// The client's frame to the local VIP, from `sport`.
    fn local_client(&self, sport: u16, l4: L4) -> Frame {
        Frame {
            sport,
            ..self.client_frame(self.local_vip, 6443, l4)
        }
    }

    /// What the host's stack sends back for the client's frame: from the
    /// backend's address and port (this host's) to the client.
    fn local_reply(&self, sport: u16, l4: L4) -> Frame {
        Frame {
            src_mac: self.lb_mac,
            dst_mac: self.client_mac,
            vlan: None,
            src: self.lb,
            dst: self.client,
            sport: LOCAL_PORT,
            dport: sport,
            l4,
            payload: b"",
        }
    }

    fn local_flags(&self, sport: u16) -> Option<u32> {
        let mut key = self.flow(self.local_vip, 6443, PROTO_TCP);
        key.src_port = port_to_wire(sport);
        self.dataplane
            .flows()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f.flags)
    }

    fn egress_count(&self, verdict: EgressVerdict) -> u64 {
        self.dataplane.egress_verdicts().unwrap()[verdict as usize]
            .1
            .packets
    }

    /// The client's frame through XDP: passed up, to the backend's address and port.
    fn client_delivered(&self, sport: u16, l4: L4) {
        let frame = self.local_client(sport, l4);
        let (verdict, out) = self.run(&frame.build());
        assert_eq!(verdict, XDP_PASS, "{l4:?}");
        let expected = Frame {
            dst: self.lb,
            dport: LOCAL_PORT,
            ..frame
        };
        assert_eq!(out, expected.build(), "{l4:?}: translated for delivery");
        assert_checksums_valid("delivered", &out);
    }

    /// The listener's reply through the egress program: sent from the VIP.
    fn reply_translated(&self, sport: u16, l4: L4) {
        let before = self.egress_count(EgressVerdict::Translated);
        let frame = self.local_reply(sport, l4);
        let (action, out) = self.run_egress(&frame.build());
        assert_eq!(action, TC_ACT_OK);
        let expected = Frame {
            src: self.local_vip,
            sport: 6443,
            ..frame
        };
        assert_eq!(
            out,
            expected.build(),
            "{l4:?}: the reply leaves from the VIP"
        );
        assert_checksums_valid("reply", &out);
        assert_eq!(self.egress_count(EgressVerdict::Translated), before + 1);
    }

    /// A packet through the egress program that must leave untouched, counted as `verdict`.
    fn egress_untouched(&self, name: &str, frame: &[u8], verdict: EgressVerdict) {
        let before = self.egress_count(verdict);
        let (action, out) = self.run_egress(frame);
        assert_eq!(action, TC_ACT_OK, "{name}: never dropped");
        assert_eq!(out, frame, "{name}: untouched");
        assert_eq!(
            self.egress_count(verdict),
            before + 1,
            "{name}: counted as {}",
            verdict.label()
        );
    }
}

#[test]
fn a_local_flow_is_translated_both_ways_and_its_state_fed_by_both_sides() {
    let w = world();
    let port = CLIENT_PORT;
    w.client_delivered(port, SYN);
    assert_eq!(
        w.local_flags(port),
        Some(FLOW_LOCAL),
        "new: nothing answered yet"
    );
    // Its reverse entry names the client's own address and port at the backend.
    let key = {
        let mut key = w.flow(w.local_vip, 6443, PROTO_TCP);
        key.src_port = port_to_wire(port);
        key
    };
    let nat_key = NatKey {
        backend_addr: addr_to_wire(w.lb.octets()),
        lb_addr: addr_to_wire(w.client.octets()),
        backend_port: port_to_wire(LOCAL_PORT),
        nat_port: port_to_wire(port),
        protocol: PROTO_TCP,
        _pad: [0; 3],
    };
    let entries = w.dataplane.reverse_entries().unwrap();
    let entry = entries.iter().find(|(k, _)| *k == nat_key);
    assert_eq!(entry.map(|(_, e)| e.flow), Some(key), "{entries:?}");

    // A client's ACK before any answer establishes nothing (as for a NATed flow).
    w.reply_translated(port, SYN_ACK);
    assert_eq!(w.local_flags(port), Some(FLOW_LOCAL | FLOW_SEEN_REPLY));
    w.client_delivered(port, ACK);
    let established = FLOW_LOCAL | FLOW_SEEN_REPLY | FLOW_ASSURED;
    assert_eq!(w.local_flags(port), Some(established));
    w.reply_translated(port, ACK);
    // The backend closes, then the client.
    w.reply_translated(port, FIN);
    assert_eq!(w.local_flags(port), Some(established | FLOW_FIN_BACKEND));
    w.client_delivered(port, FIN);
    assert_eq!(
        w.local_flags(port),
        Some(established | FLOW_FIN_BACKEND | FLOW_FIN_CLIENT)
    );
    // Leftovers of a second program (an earlier agent's) see the translated
    // reply from the VIP: no reverse entry, untouched.
    let translated = Frame {
        src: w.local_vip,
        sport: 6443,
        ..w.local_reply(port, ACK)
    }
    .build();
    w.egress_untouched(
        "an already translated reply",
        &translated,
        EgressVerdict::Pass,
    );
}

#[test]
fn the_egress_program_leaves_everything_else_untouched() {
    let w = world();
    w.client_delivered(CLIENT_PORT, SYN);
    let flags = w.local_flags(CLIENT_PORT);
    w.egress_untouched(
        "the listener's packet to a port with no flow",
        &w.local_reply(CLIENT_PORT + 1, SYN_ACK).build(),
        EgressVerdict::Pass,
    );
    w.egress_untouched(
        "the host's own UDP",
        &w.local_reply(CLIENT_PORT, UDP).build(),
        EgressVerdict::Pass,
    );
    let reply = w.local_reply(CLIENT_PORT, SYN_ACK).build();
    // (BPF_PROG_TEST_RUN takes no IPv4 skb shorter than its IPv4 header.)
    for cut in [34, 40, 53] {
        w.egress_untouched(
            &format!("a reply cut at {cut} bytes"),
            &reply[..cut],
            EgressVerdict::PassMalformed,
        );
    }
    let mut fragment = reply.clone();
    fragment[20] |= 0x20; // MF
    w.egress_untouched("a first fragment", &fragment, EgressVerdict::PassFragment);
    let mut arp = reply.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    w.egress_untouched("ARP", &arp, EgressVerdict::Pass);
    assert_eq!(w.local_flags(CLIENT_PORT), flags, "nothing tracked");
    // A NATed flow's reverse entry is never the egress program's.
    let (backend, _) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let (verdict, out) = w.run(&w.client_frame(w.tcp_vip, 6443, SYN).build());
    assert_eq!(verdict, XDP_TX);
    let (_, nat_port) = nat_target(&out);
    let nat_reply = Frame {
        src_mac: w.lab.host(backend).mac,
        dst_mac: w.lb_mac,
        vlan: None,
        src: w.lab.host(backend).addr,
        dst: w.lb,
        sport: 6443,
        dport: nat_port,
        l4: SYN_ACK,
        payload: b"",
    }
    .build();
    w.egress_untouched(
        "a NATed flow's tuple",
        &nat_reply,
        EgressVerdict::PassNoFlow,
    );
}

#[test]
fn a_backend_rst_seen_at_egress_closes_a_local_flow_and_the_sweep_takes_both_halves() {
    let mut w = world();
    let port = CLIENT_PORT + 7;
    w.client_delivered(port, SYN);
    w.reply_translated(port, RST);
    assert_eq!(w.local_flags(port), Some(FLOW_LOCAL | FLOW_RESET));
    // fin_linger (5 s) later the sweep forgets the flow and its reverse entry.
    let later = T0 + 10 * SECOND;
    w.dataplane.set_clock(later).unwrap();
    w.dataplane.sweep_flows(later).unwrap();
    assert_eq!(w.local_flags(port), None);
    assert!(
        w.dataplane
            .reverse_entries()
            .unwrap()
            .iter()
            .all(|(_, e)| e.flow.src_port != port_to_wire(port)),
        "the reverse entry went with the flow"
    );
    // A late reply finds no entry: untouched.
    w.egress_untouched(
        "a reply after the flow ended",
        &w.local_reply(port, ACK).build(),
        EgressVerdict::Pass,
    );
}

/// Passive health for a local backend (docs/data-path.md, "Passive
/// health"): the host's stack refuses a new flow's SYN (RST+ACK from the
/// backend's port: the local apiserver is gone) and the egress program sees
/// it, as the reply path sees a remote backend's. The backend is suspect,
/// the agent told, and with other backends in the VIP the RST is dropped
/// (`TC_ACT_SHOT`, `egress_redispatched`) and the flow forgotten, so the
/// client's SYN retransmission goes to another backend.
#[test]
fn a_local_backend_refusing_a_syn_is_suspected_and_the_syn_redispatched() {
    let w = world();
    let vip = w.stacked_vip;
    // A client port whose flow Maglev gives to this host's backend.
    let (port, syn) = (42_000..43_000)
        .find_map(|port| {
            let syn = Frame {
                sport: port,
                ..w.client_frame(vip, 6443, SYN)
            };
            let (verdict, _) = w.run(&syn.build());
            (verdict == XDP_PASS).then_some((port, syn))
        })
        .expect("a flow to the local backend");
    let mut key = w.flow(vip, 6443, PROTO_TCP);
    key.src_port = port_to_wire(port);
    let local_id = w
        .dataplane
        .flows()
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, f)| f.backend_id)
        .expect("the local flow");
    assert_eq!(w.dataplane.suspect_since(local_id).unwrap(), 0);
    let before = w.dataplane.event(Event::Redispatched).unwrap();
    // The stack's RST+ACK to the SYN, leaving through egress.
    let refusal = Frame {
        src_mac: w.lb_mac,
        dst_mac: w.client_mac,
        vlan: None,
        src: w.lb,
        dst: w.client,
        sport: LOCAL_PORT,
        dport: port,
        l4: L4::Tcp {
            syn: false,
            ack: true,
            fin: false,
            rst: true,
        },
        payload: b"",
    }
    .build();
    let counted = w.egress_count(EgressVerdict::Redispatched);
    let (action, out) = w.run_egress(&refusal);
    assert_eq!(action, TC_ACT_SHOT, "the refusal is dropped");
    assert_eq!(out, refusal, "and not rewritten");
    assert_eq!(w.egress_count(EgressVerdict::Redispatched), counted + 1);
    assert_eq!(w.dataplane.event(Event::Redispatched).unwrap(), before + 1);
    assert_ne!(w.dataplane.suspect_since(local_id).unwrap(), 0, "suspect");
    assert!(
        w.dataplane.flows().unwrap().iter().all(|(k, _)| *k != key),
        "the flow is forgotten"
    );
    assert!(
        w.dataplane
            .redispatched_flows()
            .unwrap()
            .iter()
            .any(|(k, _)| *k == key),
        "recorded: one redispatch per flow"
    );
    // The client's retransmission goes to another backend, NATed.
    let (verdict, _) = w.run(&syn.build());
    assert_eq!(
        verdict, XDP_TX,
        "the retransmitted SYN leaves for a remote backend"
    );
}
