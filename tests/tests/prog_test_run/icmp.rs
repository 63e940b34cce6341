//! ICMP errors translated both ways, and the ones the balancer answers itself.

use super::*;

/// The IPv4 packet in a frame, cut to its header and `l4_bytes` after it (what an ICMP error quotes).
fn quote(frame: &[u8], l4_bytes: usize) -> Vec<u8> {
    frame[14..14 + 20 + l4_bytes].to_vec()
}

/// RFC 5508 section 3 and RFC 1812 section 4.3, byte for byte: ICMP errors
/// about a flow are translated to the other side (outer and quoted headers,
/// every checksum), and what the balancer cannot forward it answers as a
/// router would (time exceeded, fragmentation needed with the MTU).
#[test]
fn icmp_errors_are_translated_both_ways_and_the_balancer_answers_what_it_cannot_forward() {
    use etherparse::{
        Icmpv4Type,
        icmpv4::{DestUnreachableHeader, TimeExceededCode},
    };
    let w = world();
    let (backend, hash) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let b = w.lab.host(backend).clone();
    let nat_port = hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX);
    let (udp_backend, udp_hash) = w.expected_backend(w.udp_vip, 53, PROTO_UDP);
    let ub = w.lab.host(udp_backend).clone();
    let udp_nat_port = hash::nat_port_candidate(udp_hash, 0, NAT_MIN, NAT_MAX);
    let mut udp_in = w.client_frame(w.udp_vip, 53, UDP);
    udp_in.payload = b"\x12\x34 query";
    // The flows: a TCP connection, a UDP query.
    for (input, verdict) in [
        (w.client_frame(w.tcp_vip, 6443, SYN).build(), XDP_TX),
        (udp_in.build(), XDP_TX),
    ] {
        assert_eq!(w.run(&input).0, verdict);
    }
    // What the VIP sent the client, and what the backend had sent it.
    let vip_to_client = Frame {
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
    let backend_to_nat = Frame {
        src_mac: b.mac,
        dst_mac: w.lb_mac,
        src: b.addr,
        dst: w.lb,
        sport: 6443,
        dport: nat_port,
        ..vip_to_client
    };
    // What the NAT port sent the UDP backend, and what the client had sent.
    let nat_to_udp_backend = Frame {
        src_mac: w.lb_mac,
        dst_mac: ub.mac,
        vlan: None,
        src: w.lb,
        dst: ub.addr,
        sport: udp_nat_port,
        dport: 5353,
        l4: UDP,
        payload: b"\x12\x34 query",
    };
    // A router on the client's side: an address of the LAN no host owns.
    let router = Ipv4Addr::new(10, 201, w.lb.octets()[2], 150);
    let router_mac = [0x02, 0, 0, 0, 0x96, 1];
    let frag_needed =
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        });
    let port_unreachable = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
    let whole = |f: &Frame| quote(&f.build(), 20);
    let eight = |f: &Frame| quote(&f.build(), 8);
    // About a client port no flow of the tables uses.
    let no_flow_error = icmp_frame(
        router_mac,
        w.lb_mac,
        router,
        w.tcp_vip,
        64,
        false,
        frag_needed.clone(),
        &whole(&Frame {
            dport: CLIENT_PORT + 1,
            ..vip_to_client
        }),
    );
    let cases = vec![
        Case {
            name: "fragmentation needed from the client's side, quoting the VIP's segment with its whole TCP header: \
                   to the backend, from the NAT address, quoting the backend's segment",
            input: icmp_frame(
                router_mac,
                w.lb_mac,
                router,
                w.tcp_vip,
                64,
                false,
                frag_needed.clone(),
                &whole(&vip_to_client),
            ),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                b.mac,
                w.lb,
                b.addr,
                63,
                false,
                frag_needed.clone(),
                &whole(&backend_to_nat),
            ),
            counted_as: Verdict::IcmpForwardTx,
        },
        Case {
            name: "the same quoting only 8 bytes of TCP: ports translated, the TCP checksum not quoted",
            input: icmp_frame(
                router_mac,
                w.lb_mac,
                router,
                w.tcp_vip,
                64,
                false,
                frag_needed.clone(),
                &eight(&vip_to_client),
            ),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                b.mac,
                w.lb,
                b.addr,
                63,
                false,
                frag_needed.clone(),
                &eight(&backend_to_nat),
            ),
            counted_as: Verdict::IcmpForwardTx,
        },
        Case {
            name: "port unreachable from the UDP backend about the NAT port's datagram: to the client, from the VIP, \
                   quoting the client's datagram (UDP checksum translated)",
            input: icmp_frame(
                ub.mac,
                w.lb_mac,
                ub.addr,
                w.lb,
                64,
                false,
                port_unreachable.clone(),
                &quote(&nat_to_udp_backend.build(), 8 + 7),
            ),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                w.client_mac,
                w.udp_vip,
                w.client,
                63,
                false,
                port_unreachable.clone(),
                &quote(&udp_in.build(), 8 + 7),
            ),
            counted_as: Verdict::IcmpReplyTx,
        },
        Case {
            name: "time exceeded from a router on the backend's side about the NAT port's segment: to the client",
            input: icmp_frame(
                b.mac,
                w.lb_mac,
                b.addr,
                w.lb,
                64,
                false,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                &whole(&Frame {
                    src_mac: w.lb_mac,
                    dst_mac: b.mac,
                    src: w.lb,
                    dst: b.addr,
                    sport: nat_port,
                    dport: 6443,
                    l4: ACK,
                    ..vip_to_client
                }),
            ),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                w.client_mac,
                w.tcp_vip,
                w.client,
                63,
                false,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                &whole(&w.client_frame(w.tcp_vip, 6443, ACK)),
            ),
            counted_as: Verdict::IcmpReplyTx,
        },
        Case {
            name: "an error about a flow the tables do not hold: passed to the host",
            input: no_flow_error.clone(),
            verdict: XDP_PASS,
            output: no_flow_error,
            counted_as: Verdict::PassIcmp,
        },
        Case {
            name: "an error about our flow with its TTL run out: dropped, never answered",
            input: icmp_frame(
                router_mac,
                w.lb_mac,
                router,
                w.tcp_vip,
                1,
                false,
                frag_needed.clone(),
                &whole(&vip_to_client),
            ),
            verdict: XDP_DROP,
            output: Vec::new(),
            counted_as: Verdict::DropTtlExceeded,
        },
        Case {
            name: "a segment of the flow with TTL 1: answered with time exceeded from the VIP, quoting it as it came",
            input: w.client_frame(w.tcp_vip, 6443, ACK).build_with_ttl(1),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                w.client_mac,
                w.tcp_vip,
                w.client,
                64,
                true,
                Icmpv4Type::TimeExceeded(TimeExceededCode::TtlExceededInTransit),
                &quote(&w.client_frame(w.tcp_vip, 6443, ACK).build_with_ttl(1), 8),
            ),
            counted_as: Verdict::IcmpTimeExceededTx,
        },
        Case {
            name: "a DF segment larger than the route to the backend allows: answered with fragmentation needed, MTU 1500",
            input: Frame {
                payload: &[0x5a; 1500],
                ..w.client_frame(w.tcp_vip, 6443, ACK)
            }
            .build(),
            verdict: XDP_TX,
            output: icmp_frame(
                w.lb_mac,
                w.client_mac,
                w.tcp_vip,
                w.client,
                64,
                true,
                Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1500,
                }),
                &quote(
                    &Frame {
                        payload: &[0x5a; 1500],
                        ..w.client_frame(w.tcp_vip, 6443, ACK)
                    }
                    .build(),
                    8,
                ),
            ),
            counted_as: Verdict::IcmpFragNeededTx,
        },
    ];
    run_cases(&w, cases);
    // Fragments of a reply are never half translated: the first (MF set,
    // with the ports) is dropped, a later one (no ports) passed untouched.
    let mut first = Frame {
        payload: b"0123456789abcdef",
        ..backend_to_nat
    }
    .build();
    first[20] = 0x20;
    let mut later = first.clone();
    later[20] = 0x00;
    later[21] = 0x02;
    run_cases(
        &w,
        vec![
            Case {
                name: "first fragment of a backend's reply to its flow's NAT port: dropped",
                input: first,
                verdict: XDP_DROP,
                output: Vec::new(),
                counted_as: Verdict::DropVipFragment,
            },
            Case {
                name: "later fragment of a reply: passed untouched (no ports to know it by)",
                output: later.clone(),
                input: later,
                verdict: XDP_PASS,
                counted_as: Verdict::PassFragment,
            },
        ],
    );
}
