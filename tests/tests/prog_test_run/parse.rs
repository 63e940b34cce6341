//! What the parser accepts and refuses: VLAN tags, UDP with and without a
//! checksum, and frames that are not ours or cannot be handled (truncated,
//! IP options, fragments, bad IHL, ARP, non-VIP, no route, ...).

use super::*;

#[test]
fn vlan_tagged_and_udp_frames_are_rewritten_with_correct_checksums() {
    let w = world();
    let (backend, hash) = w.expected_backend(w.tcp_vip, 6443, PROTO_TCP);
    let b = w.lab.host(backend);
    let mut tagged = w.client_frame(w.tcp_vip, 6443, SYN);
    tagged.vlan = Some(205);
    let tagged_out = Frame {
        src_mac: w.lb_mac,
        dst_mac: b.mac,
        vlan: Some(205),
        src: w.lb,
        dst: b.addr,
        sport: hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX),
        dport: 6443,
        l4: SYN,
        payload: b"",
    };
    let (udp_backend, udp_hash) = w.expected_backend(w.udp_vip, 53, PROTO_UDP);
    let ub = w.lab.host(udp_backend);
    let udp_out = |l4: L4| Frame {
        src_mac: w.lb_mac,
        dst_mac: ub.mac,
        vlan: None,
        src: w.lb,
        dst: ub.addr,
        sport: hash::nat_port_candidate(udp_hash, 0, NAT_MIN, NAT_MAX),
        dport: 5353,
        l4,
        payload: b"\x12\x34 query",
    };
    let mut udp_in = w.client_frame(w.udp_vip, 53, UDP);
    udp_in.payload = b"\x12\x34 query";
    let mut udp_zero_in = w.client_frame(w.udp_vip, 53, UDP_NO_CHECKSUM);
    udp_zero_in.payload = b"\x12\x34 query";
    run_cases(
        &w,
        vec![
            Case {
                name: "802.1Q-tagged SYN to VIP: rewritten, tag kept, sent back out",
                input: tagged.build(),
                verdict: XDP_TX,
                output: tagged_out.forwarded(),
                counted_as: Verdict::ForwardTx,
            },
            Case {
                name: "UDP with checksum to VIP",
                input: udp_in.build(),
                verdict: XDP_TX,
                output: udp_out(UDP).forwarded(),
                counted_as: Verdict::ForwardTx,
            },
            Case {
                name: "UDP without checksum to VIP: the checksum stays zero",
                input: udp_zero_in.build(),
                verdict: XDP_TX,
                output: udp_out(UDP_NO_CHECKSUM).forwarded(),
                counted_as: Verdict::ForwardTx,
            },
        ],
    );
}

#[test]
fn frames_that_are_not_ours_or_cannot_be_handled_pass_or_drop_untouched() {
    let w = world();
    let syn = w.client_frame(w.tcp_vip, 6443, SYN).build();
    let to_lb_ssh = Frame {
        dst: w.lb,
        dport: 22,
        ..w.client_frame(w.lb, 22, SYN)
    }
    .build();

    let mut cases = vec![
        Case {
            name: "TCP to the LB's own port 22",
            input: to_lb_ssh.clone(),
            verdict: XDP_PASS,
            output: to_lb_ssh,
            counted_as: Verdict::PassTcp,
        },
        Case {
            name: "TCP to the VIP on another port",
            input: w.client_frame(w.tcp_vip, 22, SYN).build(),
            verdict: XDP_PASS,
            output: w.client_frame(w.tcp_vip, 22, SYN).build(),
            counted_as: Verdict::PassTcp,
        },
        Case {
            name: "VIP that this host does not own (disabled)",
            input: w.client_frame(w.disabled_vip, 6443, SYN).build(),
            verdict: XDP_PASS,
            output: w.client_frame(w.disabled_vip, 6443, SYN).build(),
            counted_as: Verdict::PassVipDisabled,
        },
        Case {
            name: "VIP whose backend is this host: translated to it, passed up for local delivery",
            input: w.client_frame(w.local_vip, 6443, SYN).build(),
            verdict: XDP_PASS,
            output: Frame {
                dst: w.lb,
                dport: super::LOCAL_PORT,
                ..w.client_frame(w.local_vip, 6443, SYN)
            }
            .build(),
            counted_as: Verdict::PassLocalBackend,
        },
        Case {
            name: "backend's neighbour unresolved: dropped, counted",
            input: w.client_frame(w.unresolved_vip, 6443, SYN).build(),
            verdict: XDP_DROP,
            output: Vec::new(),
            counted_as: Verdict::DropNoNeighbour,
        },
        Case {
            name: "no route to the backend: dropped, counted",
            input: w.client_frame(w.unrouted_vip, 6443, SYN).build(),
            verdict: XDP_DROP,
            output: Vec::new(),
            counted_as: Verdict::DropNoRoute,
        },
    ];
    // Truncated at and around every header boundary: Ethernet (14), IPv4 (34), TCP (54).
    // (BPF_PROG_TEST_RUN refuses frames under 14 bytes, as no driver delivers them.)
    for cut in [14usize, 15, 20, 33, 34, 35, 37, 38, 40, 47, 53] {
        let frame = syn[..cut].to_vec();
        cases.push(Case {
            name: Box::leak(format!("SYN to VIP truncated to {cut} bytes").into_boxed_str()),
            input: frame.clone(),
            verdict: XDP_PASS,
            output: frame,
            counted_as: Verdict::PassMalformed,
        });
    }
    // IP options: IHL 6 with one 4-byte row of NOPs.
    let mut with_options = syn[..34].to_vec();
    with_options.extend_from_slice(&[1, 1, 1, 1]);
    with_options.extend_from_slice(&syn[34..]);
    with_options[14] = 0x46;
    let total = u16::from_be_bytes([with_options[16], with_options[17]]) + 4;
    with_options[16..18].copy_from_slice(&total.to_be_bytes());
    cases.push(Case {
        name: "IPv4 options to a VIP: dropped",
        input: with_options,
        verdict: XDP_DROP,
        output: Vec::new(),
        counted_as: Verdict::DropVipIpOptions,
    });
    let mut first_fragment = syn.clone();
    first_fragment[20] = 0x20; // MF
    cases.push(Case {
        name: "first fragment to a VIP: dropped",
        input: first_fragment,
        verdict: XDP_DROP,
        output: Vec::new(),
        counted_as: Verdict::DropVipFragment,
    });
    let mut later_fragment = syn.clone();
    later_fragment[21] = 0x10; // offset 16 x 8 bytes
    cases.push(Case {
        name: "later fragment: passed (no ports)",
        output: later_fragment.clone(),
        input: later_fragment,
        verdict: XDP_PASS,
        counted_as: Verdict::PassFragment,
    });
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    cases.push(Case {
        name: "IPv4 header length 16: malformed, passed",
        output: bad_ihl.clone(),
        input: bad_ihl,
        verdict: XDP_PASS,
        counted_as: Verdict::PassMalformed,
    });
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&w.client_mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&w.client_mac);
    arp.extend_from_slice(&w.client.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&w.tcp_vip.octets());
    cases.push(Case {
        name: "ARP for the VIP: passed",
        output: arp.clone(),
        input: arp,
        verdict: XDP_PASS,
        counted_as: Verdict::PassNonIpv4,
    });

    run_cases(&w, cases);
    assert!(
        w.dataplane
            .flows()
            .unwrap()
            .iter()
            .all(|(k, _)| k.dst_addr == addr_to_wire(w.local_vip.octets())
                || k.dst_addr == addr_to_wire(w.unresolved_vip.octets())
                || k.dst_addr == addr_to_wire(w.unrouted_vip.octets()))
    );
}
