//! NAT through the VIP: the handshake, the established flow and the backend's
//! reply rewritten; NAT port collisions and exhaustion; counters; drained and
//! down backends; the reply to the client's learned MAC.

use super::*;

#[test]
fn tcp_flow_through_the_vip_syn_established_reply_and_reset() {
    let mut w = world();
    let (backend, hash) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let backend_host = w.lab.host(backend).clone();
    let (lb, lb_mac, client, client_mac, tcp_vip) =
        (w.lb, w.lb_mac, w.client, w.client_mac, w.tcp_vip);
    let nat_port = hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX);
    let to_backend = |l4: L4, payload: &'static [u8]| Frame {
        src_mac: lb_mac,
        dst_mac: backend_host.mac,
        vlan: None,
        src: lb,
        dst: backend_host.addr,
        sport: nat_port,
        dport: 6443,
        l4,
        payload,
    };
    let reply = |l4: L4, payload: &'static [u8]| Frame {
        src_mac: backend_host.mac,
        dst_mac: lb_mac,
        vlan: None,
        src: backend_host.addr,
        dst: lb,
        sport: 6443,
        dport: nat_port,
        l4,
        payload,
    };
    let to_client = |l4: L4, payload: &'static [u8]| Frame {
        src_mac: lb_mac,
        dst_mac: client_mac,
        vlan: None,
        src: tcp_vip,
        dst: client,
        sport: 6443,
        dport: CLIENT_PORT,
        l4,
        payload,
    };
    let mut established = w.client_frame(w.tcp_vip, 6443, ACK);
    established.payload = b"GET /readyz HTTP/1.1\r\n\r\n";
    run_cases(
        &w,
        vec![
            Case {
                name: "SYN to VIP: Maglev backend, NAT to LB address and port",
                input: w.client_frame(w.tcp_vip, 6443, SYN).build(),
                verdict: XDP_TX,
                output: to_backend(SYN, b"").forwarded(),
                counted_as: Verdict::ForwardTx,
            },
            Case {
                name: "established packet with payload: same backend and port",
                input: established.build(),
                verdict: XDP_TX,
                output: to_backend(ACK, b"GET /readyz HTTP/1.1\r\n\r\n").forwarded(),
                counted_as: Verdict::ForwardTx,
            },
            Case {
                name: "reply from backend: back to VIP -> client",
                input: reply(SYN_ACK, b"").build(),
                verdict: XDP_TX,
                output: to_client(SYN_ACK, b"").forwarded(),
                counted_as: Verdict::ReplyTx,
            },
        ],
    );
    assert_eq!(
        w.dataplane.event(Event::NewFlow).unwrap(),
        1,
        "one flow, one entry"
    );
    assert_eq!(w.dataplane.flows().unwrap().len(), 1);

    // RST closes the flow: forwarded, and the entry lingers closed for
    // `fin_linger`, so the other side's last packets still get through.
    run_cases(
        &w,
        vec![Case {
            name: "RST from client: forwarded, the flow closed",
            input: w.client_frame(w.tcp_vip, 6443, RST).build(),
            verdict: XDP_TX,
            output: to_backend(RST, b"").forwarded(),
            counted_as: Verdict::ForwardTx,
        }],
    );
    let flows = w.dataplane.flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_ne!(flows[0].1.flags & ha_common::FLOW_RESET, 0);
    assert_eq!(w.dataplane.event(Event::FlowReset).unwrap(), 1);
    run_cases(
        &w,
        vec![Case {
            name: "reply within fin_linger of the RST: still translated",
            input: reply(ACK, b"").build(),
            verdict: XDP_TX,
            output: to_client(ACK, b"").forwarded(),
            counted_as: Verdict::ReplyTx,
        }],
    );
    // After fin_linger the flow has ended. A late reply is dropped: handed to
    // this host's stack, it would be answered with an RST (the old behaviour).
    w.dataplane.set_clock(T0 + 7 * SECOND).unwrap();
    run_cases(
        &w,
        vec![Case {
            name: "reply after the flow ended: dropped, not passed to the host",
            input: reply(ACK, b"").build(),
            verdict: XDP_DROP,
            output: Vec::new(),
            counted_as: Verdict::DropReplyNoFlow,
        }],
    );
    assert!(w.dataplane.flows().unwrap().is_empty());
    assert!(w.dataplane.reverse_entries().unwrap().is_empty());
    // The same 5-tuple gets the same (freed) NAT port again.
    run_cases(
        &w,
        vec![Case {
            name: "NAT port reuse: a new SYN after the flow ended gets the freed port",
            input: w.client_frame(w.tcp_vip, 6443, SYN).build(),
            verdict: XDP_TX,
            output: to_backend(SYN, b"").forwarded(),
            counted_as: Verdict::ForwardTx,
        }],
    );
}

#[test]
fn nat_port_collision_takes_the_next_candidate_never_a_shared_port() {
    let mut w = world();
    let (backend, hash) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let backend_host = w.lab.host(backend).clone();
    let first = hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX);
    let second = hash::nat_port_candidate(hash, 1, NAT_MIN, NAT_MAX);
    // Another flow already holds the first candidate towards that backend.
    let other = FlowKey {
        src_port: port_to_wire(50000),
        ..w.flow(w.tcp_vip, 6443, PROTO_TCP)
    };
    let taken = NatKey {
        backend_addr: addr_to_wire(backend_host.addr.octets()),
        lb_addr: addr_to_wire(w.lb.octets()),
        backend_port: port_to_wire(6443),
        nat_port: port_to_wire(first),
        protocol: PROTO_TCP,
        _pad: [0; 3],
    };
    // An established flow, both halves (an orphan or an embryonic owner would give the port up).
    let owner = NatEntry {
        flow: other,
        backend_id: w.dataplane.backend_id_of(backend_host.addr, 6443).unwrap(),
        _pad: 0,
        created_ns: T0,
    };
    w.dataplane.insert_reverse_entry(&taken, &owner).unwrap();
    w.dataplane
        .insert_flow(
            &other,
            &ha_common::Flow {
                backend_id: owner.backend_id,
                flags: ha_common::FLOW_SEEN_REPLY | ha_common::FLOW_ASSURED,
                last_seen_ns: T0,
                nat_addr: taken.lb_addr,
                nat_port: taken.nat_port,
                ..ha_common::Flow::default()
            },
        )
        .unwrap();
    let expected = Frame {
        src_mac: w.lb_mac,
        dst_mac: backend_host.mac,
        vlan: None,
        src: w.lb,
        dst: backend_host.addr,
        sport: second,
        dport: 6443,
        l4: SYN,
        payload: b"",
    };
    run_cases(
        &w,
        vec![Case {
            name: "SYN whose first NAT port is taken",
            input: w.client_frame(w.tcp_vip, 6443, SYN).build(),
            verdict: XDP_TX,
            output: expected.forwarded(),
            counted_as: Verdict::ForwardTx,
        }],
    );
    assert_eq!(w.dataplane.event(Event::NatPortCollision).unwrap(), 1);
    // The other flow's entry is untouched.
    let entries = w.dataplane.reverse_entries().unwrap();
    assert!(entries.contains(&(taken, owner)), "{entries:?}");
}

#[test]
fn traffic_counters_follow_vip_and_backend() {
    let w = world();
    let (backend, _) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let syn = w.client_frame(w.tcp_vip, 6443, SYN).build();
    let ack = w.client_frame(w.tcp_vip, 6443, ACK).build();
    assert_eq!(w.run(&syn).0, XDP_TX);
    assert_eq!(w.run(&ack).0, XDP_TX);
    let traffic = w.dataplane.traffic().unwrap();
    let (_, vip) = traffic
        .vips
        .iter()
        .find(|(name, _)| name == "apiserver")
        .unwrap();
    assert_eq!(
        (vip.packets, vip.bytes, vip.new_flows),
        (2, (syn.len() + ack.len()) as u64, 1)
    );
    let backend_addr = w.lab.host(backend).addr;
    let (_, b) = traffic
        .backends
        .iter()
        .find(|(key, _)| *key == (backend_addr.into(), 6443))
        .unwrap();
    assert_eq!((b.packets, b.new_flows), (2, 1));
}

/// One backend and one NAT port: at most one concurrent flow.
fn one_port_world() -> World {
    let mut w = world();
    let mut settings = w.dataplane.settings();
    settings.nat[0].port_min = 30000;
    settings.nat[0].port_max = 30000;
    let one = vec![DesiredBackend {
        address: w.lab.host("api1").addr.into(),
        port: 6443,
        weight: 1,
        local: false,
        down: false,
    }];
    w.dataplane
        .apply(
            &settings,
            &[vip("apiserver", w.tcp_vip, 6443, PROTO_TCP, one)],
        )
        .unwrap();
    w
}

#[test]
fn nat_port_exhaustion_by_established_flows_is_counted_and_dropped_never_shared() {
    let w = one_port_world();
    let first = Conversation::new(&w, CLIENT_PORT);
    first.handshake();
    let mut second = w.client_frame(w.tcp_vip, 6443, SYN);
    second.sport = CLIENT_PORT + 1;
    let before = w.dataplane.verdicts().unwrap();
    let collisions = w.dataplane.event(Event::NatPortCollision).unwrap();
    assert_eq!(w.run(&second.build()).0, XDP_DROP);
    assert_eq!(w.delta(Verdict::DropNatExhausted, &before), 1);
    assert_eq!(
        w.dataplane.event(Event::NatPortCollision).unwrap() - collisions,
        ha_common::NAT_PORT_ATTEMPTS as u64
    );
    let entries = w.dataplane.reverse_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].1.flow,
        first.key(),
        "the port stays with the established flow"
    );
    assert_eq!(first.client(ACK).0, XDP_TX, "which carries on");
}

#[test]
fn an_unanswered_flow_gives_its_port_to_a_new_one() {
    // Issue 12, case 1, at its smallest: the only port is held by a SYN that
    // nobody answered; a new connection takes it instead of being dropped.
    let w = one_port_world();
    let spoofed = Conversation::new(&w, CLIENT_PORT);
    spoofed
        .nat_port
        .store(30000, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(spoofed.client(SYN).0, XDP_TX);
    assert_eq!(
        spoofed.backend(SYN_ACK).0,
        XDP_TX,
        "even answered: not confirmed"
    );
    let real = Conversation::new(&w, CLIENT_PORT + 1);
    let (verdict, out) = real.client(SYN);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(nat_target(&out).1, 30000);
    assert_eq!(w.dataplane.event(Event::EmbryonicEvicted).unwrap(), 1);
    assert_eq!(spoofed.flags(), None, "the unconfirmed flow is gone");
    let entries = w.dataplane.reverse_entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.flow, real.key());
}

#[test]
fn a_draining_backend_keeps_its_flows_and_a_down_backend_loses_them() {
    let mut w = world();
    let settings = w.dataplane.settings();
    let syn = w.client_frame(w.tcp_vip, 6443, SYN).build();
    let ack = w.client_frame(w.tcp_vip, 6443, ACK).build();
    let (verdict, out) = w.run(&syn);
    assert_eq!(verdict, XDP_TX);
    let (first_backend, first_port) = nat_target(&out);
    let with_state = |weight_of_first: u32, first_down: bool| {
        let backends = APIS
            .iter()
            .map(|n| {
                let address = w.lab.host(n).addr;
                let first = address == first_backend;
                DesiredBackend {
                    address: address.into(),
                    port: 6443,
                    weight: if first { weight_of_first } else { 1 },
                    local: false,
                    down: first && first_down,
                }
            })
            .collect();
        vec![vip("apiserver", w.tcp_vip, 6443, PROTO_TCP, backends)]
    };

    // Draining (weight 0, answering): the established flow stays, with its port.
    let draining = with_state(0, false);
    w.dataplane.apply(&settings, &draining).unwrap();
    let (verdict, out) = w.run(&ack);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        nat_target(&out),
        (first_backend, first_port),
        "a draining backend keeps its flow"
    );
    assert!(
        !w.dataplane
            .active_table(w.tcp_vip, 6443, PROTO_TCP)
            .unwrap()
            .contains(&w.dataplane.backend_id_of(first_backend, 6443).unwrap())
    );

    // Down (not answering): the next packet moves the flow to a live backend.
    let down = with_state(0, true);
    w.dataplane.apply(&settings, &down).unwrap();
    let (verdict, out) = w.run(&ack);
    assert_eq!(verdict, XDP_TX);
    let (moved_to, _) = nat_target(&out);
    assert_ne!(moved_to, first_backend, "a down backend's flow moved");
    assert_eq!(w.dataplane.event(Event::MovedFromDownBackend).unwrap(), 1);
    // And stays on its new backend afterwards.
    assert_eq!(nat_target(&w.run(&ack).1).0, moved_to);
    assert_eq!(w.dataplane.flows().unwrap().len(), 1);
    assert_eq!(
        w.dataplane.reverse_entries().unwrap().len(),
        1,
        "the old NAT port was freed"
    );
}

#[test]
fn a_reply_goes_to_the_clients_learned_mac_when_the_kernel_has_no_neighbour_for_it() {
    let w = world();
    // As on an LB that just took the VIP over: it never exchanged a packet with the client.
    let client = w.client.to_string();
    w.lab
        .exec("lb", &["ip", "neigh", "del", &client, "dev", "eth0"])
        .unwrap();
    let (backend, hash) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let b = w.lab.host(backend).clone();
    let nat_port = hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX);
    assert_eq!(
        w.run(&w.client_frame(w.tcp_vip, 6443, SYN).build()).0,
        XDP_TX
    );
    let reply = Frame {
        src_mac: b.mac,
        dst_mac: w.lb_mac,
        vlan: None,
        src: b.addr,
        dst: w.lb,
        sport: 6443,
        dport: nat_port,
        l4: SYN_ACK,
        payload: b"",
    };
    let to_client = Frame {
        src_mac: w.lb_mac,
        dst_mac: w.client_mac,
        vlan: None,
        src: w.tcp_vip,
        dst: w.client,
        sport: 6443,
        dport: CLIENT_PORT,
        l4: SYN_ACK,
        payload: b"",
    };
    run_cases(
        &w,
        vec![Case {
            name: "reply with no neighbour entry for the client",
            input: reply.build(),
            verdict: XDP_TX,
            output: to_client.forwarded(),
            counted_as: Verdict::ReplyTx,
        }],
    );
    assert_eq!(w.dataplane.event(Event::ReplyToLearnedMac).unwrap(), 1);
}
