//! BPF_PROG_TEST_RUN fixture table, in the style of Katran's tester: each case
//! is a name, an input frame built here, the expected verdict and the
//! expected output frame. Expected frames are built with etherparse, which
//! computes every checksum itself: an independent implementation, not the
//! code under test.
//!
//! The program runs inside a lab host's namespace with `ingress_ifindex` set
//! to its eth0, so `bpf_fib_lookup` answers from a real routing table and
//! real (permanent) neighbour entries.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice, VlanId};
use ha_common::{
    Event, FlowKey, NatEntry, NatKey, PROTO_TCP, PROTO_UDP, Verdict, addr_to_wire, hash,
    port_to_wire,
};
use ha_lab::Lab;
use ha_user::{
    config::DataPlaneConfig,
    dataplane::{DataPlane, DesiredBackend, DesiredVip, LoadOptions},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TABLE_SIZE: u32 = 1009;
const NAT_MIN: u16 = 20000;
const NAT_MAX: u16 = 20999;
const CLIENT_PORT: u16 = 40001;
/// The virtual clock every packet sees at the start (`Settings::clock_ns`).
const T0: u64 = 1_000_000 * SECOND;
const SECOND: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug)]
enum L4 {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
        rst: bool,
    },
    Udp {
        zero_checksum: bool,
    },
}

const SYN: L4 = L4::Tcp {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
};
const ACK: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
};
const SYN_ACK: L4 = L4::Tcp {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
};
const RST: L4 = L4::Tcp {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
};
const UDP: L4 = L4::Udp {
    zero_checksum: false,
};
const UDP_NO_CHECKSUM: L4 = L4::Udp {
    zero_checksum: true,
};

struct Frame {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    l4: L4,
    payload: &'static [u8],
}

/// The TTL of every input frame; a forwarded frame leaves with one less.
const TTL: u8 = 64;

impl Frame {
    fn build(&self) -> Vec<u8> {
        self.build_with_ttl(TTL)
    }

    /// As the balancer sends it on: one hop later.
    fn forwarded(&self) -> Vec<u8> {
        self.build_with_ttl(TTL - 1)
    }

    fn build_with_ttl(&self, ttl: u8) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(self.src_mac, self.dst_mac);
        let mut out = Vec::new();
        macro_rules! finish {
            ($ip:expr) => {{
                let ip = $ip;
                match self.l4 {
                    L4::Tcp { syn, ack, fin, rst } => {
                        let mut tcp = ip.tcp(self.sport, self.dport, 1000, 64240);
                        if syn {
                            tcp = tcp.syn();
                        }
                        if ack {
                            tcp = tcp.ack(5000);
                        }
                        if fin {
                            tcp = tcp.fin();
                        }
                        if rst {
                            tcp = tcp.rst();
                        }
                        tcp.write(&mut out, self.payload).unwrap();
                    }
                    L4::Udp { .. } => ip
                        .udp(self.sport, self.dport)
                        .write(&mut out, self.payload)
                        .unwrap(),
                }
            }};
        }
        match self.vlan {
            Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).unwrap()).ipv4(
                self.src.octets(),
                self.dst.octets(),
                ttl
            )),
            None => finish!(eth.ipv4(self.src.octets(), self.dst.octets(), ttl)),
        }
        if let L4::Udp {
            zero_checksum: true,
        } = self.l4
        {
            let l4 = 14 + self.vlan.map_or(0, |_| 4) + 20;
            out[l4 + 6] = 0;
            out[l4 + 7] = 0;
        }
        out
    }
}

struct World {
    lab: Lab,
    dataplane: DataPlane,
    ifindex: u32,
    lb: Ipv4Addr,
    lb_mac: [u8; 6],
    client: Ipv4Addr,
    client_mac: [u8; 6],
    tcp_vip: Ipv4Addr,
    udp_vip: Ipv4Addr,
    unresolved_vip: Ipv4Addr,
    unrouted_vip: Ipv4Addr,
    local_vip: Ipv4Addr,
    disabled_vip: Ipv4Addr,
}

const APIS: [&str; 3] = ["api1", "api2", "api3"];

fn backends(lab: &Lab, port: u16) -> Vec<DesiredBackend> {
    APIS.iter()
        .map(|name| DesiredBackend {
            address: lab.host(name).addr.into(),
            port,
            weight: 1,
            local: false,
            down: false,
        })
        .collect()
}

fn vip(
    name: &str,
    address: Ipv4Addr,
    port: u16,
    protocol: u8,
    backends: Vec<DesiredBackend>,
) -> DesiredVip {
    DesiredVip {
        name: name.into(),
        address: address.into(),
        port,
        protocol,
        enabled: true,
        backends,
    }
}

fn world() -> World {
    let lab = Lab::new(&["client", "lb", "api1", "api2", "api3"]).expect("lab");
    // bpf_fib_lookup needs forwarding on the ingress interface (the agent turns it on).
    lab.exec(
        "lb",
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/eth0/forwarding",
        ],
    )
    .unwrap();
    // Permanent neighbours, so the FIB answers without ARP.
    lab.pin_neighbours("lb", &["client", "api1", "api2", "api3"])
        .unwrap();
    let mut dataplane = DataPlane::load(&LoadOptions {
        host_ports: None,
        accept_flow_loss: false,
        maglev_table_size: TABLE_SIZE,
        max_vips: 8,
        max_flows: 4096,
        pin_dir: None,
    })
    .expect("loading the XDP program");
    let lb = lab.host("lb").addr;
    // The configuration's default timeouts, this file's NAT range, and a virtual clock.
    let mut settings = DataPlaneConfig::default()
        .settings(lb.into())
        .expect("an IPv4 NAT source");
    settings.nat[0].port_min = NAT_MIN;
    settings.nat[0].port_max = NAT_MAX;
    settings.clock_ns = T0;
    let prefix = lab.vip(0).octets();
    let addr = |last: u8| Ipv4Addr::new(prefix[0], prefix[1], prefix[2], last);
    let (tcp_vip, udp_vip, unresolved_vip, unrouted_vip, local_vip, disabled_vip) = (
        lab.vip(0),
        lab.vip(1),
        lab.vip(2),
        lab.vip(3),
        lab.vip(4),
        lab.vip(5),
    );
    let one = |address: Ipv4Addr, local: bool| {
        vec![DesiredBackend {
            address: address.into(),
            port: 6443,
            weight: 1,
            local,
            down: false,
        }]
    };
    let mut disabled = vip(
        "disabled",
        disabled_vip,
        6443,
        PROTO_TCP,
        backends(&lab, 6443),
    );
    disabled.enabled = false;
    let vips = vec![
        vip("apiserver", tcp_vip, 6443, PROTO_TCP, backends(&lab, 6443)),
        vip("dns", udp_vip, 53, PROTO_UDP, backends(&lab, 5353)),
        // .150 is on the LAN but nobody answers ARP for it.
        vip(
            "unresolved",
            unresolved_vip,
            6443,
            PROTO_TCP,
            one(addr(150), false),
        ),
        vip(
            "unrouted",
            unrouted_vip,
            6443,
            PROTO_TCP,
            one(Ipv4Addr::new(192, 0, 2, 1), false),
        ),
        vip("local", local_vip, 6443, PROTO_TCP, one(lb, true)),
        disabled,
    ];
    dataplane.apply(&settings, &vips).expect("writing the maps");
    let ifindex = lab
        .in_host("lb", || nix::net::if_::if_nametoindex("eth0").unwrap())
        .unwrap();
    World {
        lb,
        lb_mac: lab.host("lb").mac,
        client: lab.host("client").addr,
        client_mac: lab.host("client").mac,
        lab,
        dataplane,
        ifindex,
        tcp_vip,
        udp_vip,
        unresolved_vip,
        unrouted_vip,
        local_vip,
        disabled_vip,
    }
}

impl World {
    /// Runs one frame through the program on the lb host's eth0.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&self.ifindex.to_ne_bytes());
        self.lab
            .in_host("lb", || {
                let mut out = vec![0u8; frame.len() + 256];
                let mut options = TestRunOptions::new();
                options.data_in = Some(frame);
                options.data_out = Some(&mut out);
                options.ctx_in = Some(&ctx);
                let result = self
                    .dataplane
                    .program()
                    .test_run(options)
                    .expect("BPF_PROG_TEST_RUN");
                out.truncate(result.data_size_out as usize);
                (result.return_value, out)
            })
            .unwrap()
    }

    fn client_frame(&self, vip: Ipv4Addr, dport: u16, l4: L4) -> Frame {
        Frame {
            src_mac: self.client_mac,
            dst_mac: self.lb_mac,
            vlan: None,
            src: self.client,
            dst: vip,
            sport: CLIENT_PORT,
            dport,
            l4,
            payload: b"",
        }
    }

    fn flow(&self, vip: Ipv4Addr, dport: u16, protocol: u8) -> FlowKey {
        FlowKey {
            src_addr: addr_to_wire(self.client.octets()),
            dst_addr: addr_to_wire(vip.octets()),
            src_port: port_to_wire(CLIENT_PORT),
            dst_port: port_to_wire(dport),
            protocol,
            _pad: [0; 3],
        }
    }

    /// The backend the Maglev table gives this flow, computed from the
    /// agent's copy of the table and the shared hash.
    fn expected_backend(&self, vip: Ipv4Addr, dport: u16, protocol: u8) -> (&'static str, u32) {
        let table = self.dataplane.active_table(vip, dport, protocol).unwrap();
        let hash = hash::flow_hash(&self.flow(vip, dport, protocol));
        let id = table[(hash % TABLE_SIZE) as usize];
        let name = APIS
            .iter()
            .find(|n| {
                self.dataplane.backend_id_of(
                    self.lab.host(n).addr,
                    if protocol == PROTO_UDP { 5353 } else { 6443 },
                ) == Some(id)
            })
            .expect("the table names a configured backend");
        (name, hash)
    }

    fn delta(&self, verdict: Verdict, before: &[(Verdict, ha_common::Counter)]) -> u64 {
        self.dataplane.verdict(verdict).unwrap().packets - before[verdict as usize].1.packets
    }
}

/// Checks the output's checksums with etherparse's own calculation (of an
/// ICMP message: its checksum and that of the IPv4 header it quotes).
fn assert_checksums_valid(name: &str, frame: &[u8]) {
    let packet = SlicedPacket::from_ethernet(frame)
        .unwrap_or_else(|e| panic!("{name}: output does not parse: {e}"));
    let Some(etherparse::NetSlice::Ipv4(ip)) = &packet.net else {
        panic!("{name}: no IPv4")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "{name}: IPv4 checksum"
    );
    match &packet.transport {
        Some(TransportSlice::Tcp(tcp)) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap();
            assert_eq!(tcp.checksum(), expected, "{name}: TCP checksum");
        }
        Some(TransportSlice::Icmpv4(icmp)) => {
            let mut expected = icmp.header();
            expected.update_checksum(icmp.payload());
            assert_eq!(icmp.checksum(), expected.checksum, "{name}: ICMP checksum");
            let quoted = etherparse::Ipv4HeaderSlice::from_slice(icmp.payload())
                .unwrap_or_else(|e| panic!("{name}: quoted IPv4 header: {e}"))
                .to_header();
            assert_eq!(
                quoted.header_checksum,
                quoted.calc_header_checksum(),
                "{name}: quoted IPv4 checksum"
            );
        }
        Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .unwrap();
            assert_eq!(udp.checksum(), expected, "{name}: UDP checksum");
        }
        _ => {}
    }
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    counted_as: Verdict,
}

fn run_cases(world: &World, cases: Vec<Case>) {
    for case in cases {
        let before = world.dataplane.verdicts().unwrap();
        let (verdict, out) = world.run(&case.input);
        assert_eq!(verdict, case.verdict, "{}: verdict", case.name);
        if case.verdict == XDP_TX {
            assert_checksums_valid(case.name, &out);
        }
        // A dropped frame goes nowhere; its bytes are not compared.
        if case.verdict != XDP_DROP {
            assert_eq!(out, case.output, "{}: output bytes", case.name);
        }
        assert_eq!(
            world.delta(case.counted_as, &before),
            1,
            "{}: counted as {}",
            case.name,
            case.counted_as.label()
        );
    }
}

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
            name: "VIP whose backend is this host: passed up for local delivery",
            input: w.client_frame(w.local_vip, 6443, SYN).build(),
            verdict: XDP_PASS,
            output: w.client_frame(w.local_vip, 6443, SYN).build(),
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

const FIN: L4 = L4::Tcp {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
};

/// The frames of one TCP flow through the VIP: the client's, and its backend's replies.
struct Conversation<'a> {
    w: &'a World,
    client_port: u16,
    backend: ha_lab::Host,
    /// The NAT port the flow is expected on; `handshake` sets it to the one the SYN got.
    nat_port: std::sync::atomic::AtomicU16,
}

impl<'a> Conversation<'a> {
    /// The flow from `client_port`, to the backend Maglev gives it, on its first NAT port candidate.
    fn new(w: &'a World, client_port: u16) -> Self {
        let mut key = w.flow(w.tcp_vip, 6443, PROTO_TCP);
        key.src_port = port_to_wire(client_port);
        let table = w
            .dataplane
            .active_table(w.tcp_vip, 6443, PROTO_TCP)
            .unwrap();
        let hash = hash::flow_hash(&key);
        let id = table[(hash % TABLE_SIZE) as usize];
        let name = APIS
            .iter()
            .find(|n| w.dataplane.backend_id_of(w.lab.host(n).addr, 6443) == Some(id))
            .unwrap();
        Conversation {
            w,
            client_port,
            backend: w.lab.host(name).clone(),
            nat_port: hash::nat_port_candidate(hash, 0, NAT_MIN, NAT_MAX).into(),
        }
    }

    fn client(&self, l4: L4) -> (u32, Vec<u8>) {
        let mut frame = self.w.client_frame(self.w.tcp_vip, 6443, l4);
        frame.sport = self.client_port;
        self.w.run(&frame.build())
    }

    fn backend(&self, l4: L4) -> (u32, Vec<u8>) {
        let frame = Frame {
            src_mac: self.backend.mac,
            dst_mac: self.w.lb_mac,
            vlan: None,
            src: self.backend.addr,
            dst: self.w.lb,
            sport: 6443,
            dport: self.nat_port.load(std::sync::atomic::Ordering::Relaxed),
            l4,
            payload: b"",
        };
        self.w.run(&frame.build())
    }

    /// SYN, SYN+ACK, ACK: established (on whichever NAT port the SYN got).
    fn handshake(&self) {
        let (verdict, out) = self.client(SYN);
        assert_eq!(verdict, XDP_TX);
        self.nat_port
            .store(nat_target(&out).1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(self.backend(SYN_ACK).0, XDP_TX);
        assert_eq!(self.client(ACK).0, XDP_TX);
    }

    fn key(&self) -> FlowKey {
        let mut key = self.w.flow(self.w.tcp_vip, 6443, PROTO_TCP);
        key.src_port = port_to_wire(self.client_port);
        key
    }

    fn flags(&self) -> Option<u32> {
        let key = self.key();
        self.w
            .dataplane
            .flows()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, f)| f.flags)
    }
}

#[test]
fn the_flow_state_machine_follows_the_handshake_and_both_fins() {
    use ha_common::{FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_SEEN_REPLY};
    let w = world();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(SYN).0, XDP_TX);
    assert_eq!(c.flags(), Some(0), "new: SYN seen, nothing answered");
    // A client packet never answers for the backend.
    assert_eq!(c.client(SYN).0, XDP_TX);
    assert_eq!(c.flags(), Some(0), "a retransmitted SYN changes nothing");
    assert_eq!(c.backend(SYN_ACK).0, XDP_TX);
    assert_eq!(c.flags(), Some(FLOW_SEEN_REPLY), "replied (SYN_RECV)");
    assert_eq!(c.client(ACK).0, XDP_TX);
    let established = FLOW_SEEN_REPLY | FLOW_ASSURED;
    assert_eq!(
        c.flags(),
        Some(established),
        "established by the client's ACK"
    );
    assert_eq!(c.client(FIN).0, XDP_TX);
    assert_eq!(c.flags(), Some(established | FLOW_FIN_CLIENT), "closing");
    assert_eq!(c.backend(FIN).0, XDP_TX);
    assert_eq!(
        c.flags(),
        Some(established | FLOW_FIN_CLIENT | FLOW_FIN_BACKEND),
        "closed"
    );
    // The last ACK passes within fin_linger.
    assert_eq!(c.client(ACK).0, XDP_TX);
}

#[test]
fn a_syn_on_a_closing_or_closed_flow_starts_a_fresh_one_on_a_fresh_state() {
    // Issue 12, case 5: a SYN on an entry that was closing neither reopened
    // nor re-hashed it; the new connection inherited the old FIN state.
    for close in [&[FIN][..], &[FIN, FIN], &[RST]] {
        let w = world();
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        for (i, l4) in close.iter().enumerate() {
            // Client FIN first, then the backend's.
            let sent = if i == 0 {
                c.client(*l4)
            } else {
                c.backend(*l4)
            };
            assert_eq!(sent.0, XDP_TX);
        }
        let before = w.dataplane.event(Event::NewFlow).unwrap();
        let (verdict, out) = c.client(SYN);
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            c.flags(),
            Some(0),
            "after {close:?}: a fresh entry, no FIN, not assured"
        );
        assert_eq!(w.dataplane.event(Event::SynRestartedFlow).unwrap(), 1);
        assert_eq!(w.dataplane.event(Event::NewFlow).unwrap(), before + 1);
        // Re-hashed from scratch: the same backend and port the hash gives (the old ones were freed).
        assert_eq!(
            nat_target(&out),
            (
                c.backend.addr,
                c.nat_port.load(std::sync::atomic::Ordering::Relaxed)
            )
        );
        assert_eq!(w.dataplane.reverse_entries().unwrap().len(), 1);
    }
}

#[test]
fn a_closed_flow_ends_fin_linger_after_its_last_packet() {
    let mut w = world();
    {
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        c.client(FIN);
        c.backend(FIN);
    }
    // fin_linger is 5 s (plus the 1 s refresh granularity): at 6 s it is still there.
    w.dataplane.set_clock(T0 + 6 * SECOND).unwrap();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(ACK).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ExpiredFlowReplaced).unwrap(), 0);
    // That ACK refreshed it; 7 s after it, the flow has ended: the next packet
    // of the 5-tuple is a new flow (a pickup, since it is no SYN).
    w.dataplane.set_clock(T0 + 13 * SECOND + 1).unwrap();
    let c = Conversation::new(&w, CLIENT_PORT);
    assert_eq!(c.client(ACK).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ExpiredFlowReplaced).unwrap(), 1);
    assert_eq!(w.dataplane.event(Event::MidstreamPickup).unwrap(), 1);
    assert_eq!(c.flags(), Some(0), "a fresh entry");
}

#[test]
fn the_agent_sweep_removes_ended_flows_and_their_reverse_entries() {
    let mut w = world();
    for port in 0..5u16 {
        let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
        syn.sport = 42000 + port;
        assert_eq!(w.run(&syn.build()).0, XDP_TX);
    }
    assert_eq!(w.dataplane.flows().unwrap().len(), 5);
    assert_eq!(w.dataplane.reverse_entries().unwrap().len(), 5);
    let report = w.dataplane.sweep_flows(T0).unwrap();
    assert_eq!(
        (report.live, report.expired),
        (5, 0),
        "nothing has ended yet"
    );
    // Unanswered SYNs end after tcp_syn_timeout (60 s, plus the 1 s granularity).
    let report = w.dataplane.sweep_flows(T0 + 61 * SECOND).unwrap();
    assert_eq!((report.live, report.expired), (5, 0));
    let report = w.dataplane.sweep_flows(T0 + 61 * SECOND + 1).unwrap();
    assert_eq!((report.live, report.expired), (0, 5));
    assert!(w.dataplane.flows().unwrap().is_empty());
    assert!(
        w.dataplane.reverse_entries().unwrap().is_empty(),
        "NAT ports freed"
    );
}

/// The sweep decides from a walk of both tables, and the data path keeps
/// running meanwhile: a flow made anew (a SYN on its expired entry) between
/// the walk and the deletes must stay, with its reverse entry.
#[test]
fn the_sweep_keeps_a_flow_renewed_after_its_snapshot() {
    let mut w = world();
    for port in [42000u16, 42001] {
        let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
        syn.sport = port;
        assert_eq!(w.run(&syn.build()).0, XDP_TX);
    }
    let later = T0 + 61 * SECOND + 1;
    let planned = w.dataplane.plan_sweep(later).unwrap();
    assert_eq!(
        planned.plan.remove_flows.len(),
        2,
        "both unanswered SYNs ended"
    );
    // Meanwhile the first client tries again.
    w.dataplane.set_clock(later).unwrap();
    let mut syn = w.client_frame(w.tcp_vip, 6443, SYN);
    syn.sport = 42000;
    assert_eq!(w.run(&syn.build()).0, XDP_TX);
    let report = w.dataplane.apply_sweep(planned).unwrap();
    assert_eq!((report.live, report.expired), (1, 1));
    let flows = w.dataplane.flows().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0.src_port, 42000u16.to_be());
    assert_eq!(flows[0].1.last_seen_ns, later, "the renewed flow");
    let entries = w.dataplane.reverse_entries().unwrap();
    assert_eq!(entries.len(), 1, "with its reverse entry");
    assert_eq!(entries[0].1.flow, flows[0].0);
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

/// The backend a NATed frame was sent to: (destination address, source port).
fn nat_target(frame: &[u8]) -> (Ipv4Addr, u16) {
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    (dst, u16::from_be_bytes([frame[34], frame[35]]))
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

/// Issue 12, case 5: FIN flags were set by a plain read-modify-write, so
/// FINs crossing on two CPUs could lose one and hold the port for an hour.
/// Two threads, pinned to two CPUs, send the client's and the backend's FIN
/// of the same established flow at the same moment, thousands of times;
/// both bits must be set every time.
#[test]
fn fins_crossing_on_two_cpus_are_both_recorded() {
    use std::sync::atomic::{AtomicU32, Ordering};
    if ha_user::dataplane::possible_cpus() < 2 {
        eprintln!("one CPU: nothing can cross");
        return;
    }
    // With a plain read-modify-write, about one round in six lost a FIN.
    const ROUNDS: u16 = 1000;
    let mut w = world();
    // 10,000 NAT ports per backend: every SYN finds one.
    let mut settings = w.dataplane.settings();
    settings.nat[0].port_max = NAT_MIN + 9999;
    let vips = vec![vip(
        "apiserver",
        w.tcp_vip,
        6443,
        PROTO_TCP,
        backends(&w.lab, 6443),
    )];
    w.dataplane.apply(&settings, &vips).unwrap();
    let w = w;
    let netns = format!("/run/netns/{}", w.lab.host("lb").netns);
    // Each round's flow: its own client port, established before the race.
    let conversations: Vec<Conversation> = (0..ROUNDS)
        .map(|i| Conversation::new(&w, 30000 + i))
        .collect();
    // A spinning barrier: a sleeping one wakes the threads microseconds
    // apart, and the race is a few nanoseconds wide.
    let arrived = AtomicU32::new(0);
    let start = |i: u32| {
        arrived.fetch_add(1, Ordering::AcqRel);
        while arrived.load(Ordering::Acquire) < 2 * (i + 1) {
            std::hint::spin_loop();
        }
    };
    let round = AtomicU32::new(0);
    let lost = AtomicU32::new(0);
    let run_on = |cpu: usize, frame: &dyn Fn(&Conversation) -> Vec<u8>| {
        let file = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
        let mut ctx = [0u8; 24];
        ctx[12..16].copy_from_slice(&w.ifindex.to_ne_bytes());
        for (i, c) in conversations.iter().enumerate() {
            let bytes = frame(c);
            ctx[4..8].copy_from_slice(&(bytes.len() as u32).to_ne_bytes());
            let mut out = vec![0u8; bytes.len() + 256];
            // Both threads wait here, then fire together.
            start(i as u32);
            let mut options = TestRunOptions::new();
            options.data_in = Some(&bytes);
            options.data_out = Some(&mut out);
            options.ctx_in = Some(&ctx);
            let result = w.dataplane.program().test_run(options).unwrap();
            assert_eq!(result.return_value, XDP_TX, "round {i}");
            if cpu == 0 {
                round.store(i as u32 + 1, Ordering::Release);
            }
        }
    };
    // Establish every flow first (single-threaded, on the test's own thread via World::run).
    for c in &conversations {
        c.handshake();
    }
    let client_fin = |c: &Conversation| {
        let mut f = c.w.client_frame(c.w.tcp_vip, 6443, FIN);
        f.sport = c.client_port;
        f.build()
    };
    let backend_fin = |c: &Conversation| {
        Frame {
            src_mac: c.backend.mac,
            dst_mac: c.w.lb_mac,
            vlan: None,
            src: c.backend.addr,
            dst: c.w.lb,
            sport: 6443,
            dport: c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
            l4: FIN,
            payload: b"",
        }
        .build()
    };
    std::thread::scope(|s| {
        s.spawn(|| run_on(0, &client_fin));
        s.spawn(|| run_on(1, &backend_fin));
    });
    let both = ha_common::FLOW_FIN_CLIENT | ha_common::FLOW_FIN_BACKEND;
    for c in &conversations {
        if c.flags().unwrap() & both != both {
            lost.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(round.load(Ordering::Acquire), ROUNDS as u32);
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "flows that lost a FIN out of {ROUNDS}"
    );
}

/// Issue 12, case 3: a backend's reply that misses the reverse table was
/// handed to the LB's own stack, which reset the flow. Now it is dropped
/// (the backend retransmits), the client's next packet puts the reverse
/// entry back from the connection table, and the flow carries on.
#[test]
fn a_lost_reverse_entry_drops_the_reply_and_comes_back_from_the_flow() {
    let mut w = world();
    let (nat_key, reply, client_ack) = {
        let c = Conversation::new(&w, CLIENT_PORT);
        c.handshake();
        let entries = w.dataplane.reverse_entries().unwrap();
        assert_eq!(entries.len(), 1);
        let reply = Frame {
            src_mac: c.backend.mac,
            dst_mac: w.lb_mac,
            vlan: None,
            src: c.backend.addr,
            dst: w.lb,
            sport: 6443,
            dport: c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
            l4: ACK,
            payload: b"",
        }
        .build();
        let mut ack = w.client_frame(w.tcp_vip, 6443, ACK);
        ack.sport = CLIENT_PORT;
        (entries[0].0, reply, ack.build())
    };
    w.dataplane.remove_reverse_entry(&nat_key).unwrap();
    let before = w.dataplane.verdicts().unwrap();
    let (verdict, _) = w.run(&reply);
    assert_eq!(verdict, XDP_DROP, "not passed to the host's stack");
    assert_eq!(w.delta(Verdict::DropReplyNoFlow, &before), 1);
    // The client's next packet, a second later (the flow's refresh), restores it.
    w.dataplane.set_clock(T0 + 2 * SECOND).unwrap();
    assert_eq!(w.run(&client_ack).0, XDP_TX);
    assert_eq!(w.dataplane.event(Event::ReverseRecovered).unwrap(), 1);
    assert_eq!(
        w.run(&reply).0,
        XDP_TX,
        "the backend's retransmission gets through"
    );
    assert_eq!(
        w.dataplane.reverse_entries().unwrap()[0].0,
        nat_key,
        "same port"
    );
}

/// Issue 12, case 4: a flow whose connection-table entry was lost but whose
/// reverse entry stayed collided with itself on its old NAT port and moved
/// to another one mid-connection. Now its next packet, from either side,
/// rebuilds the entry on the same port and backend.
#[test]
fn a_lost_flow_entry_comes_back_on_its_own_port_from_either_side() {
    for from_client in [true, false] {
        let mut w = world();
        let (key, port, backend) = {
            let c = Conversation::new(&w, CLIENT_PORT);
            c.handshake();
            (
                c.key(),
                c.nat_port.load(std::sync::atomic::Ordering::Relaxed),
                c.backend.addr,
            )
        };
        w.dataplane.remove_flow(&key).unwrap();
        let c = Conversation::new(&w, CLIENT_PORT);
        c.nat_port.store(port, std::sync::atomic::Ordering::Relaxed);
        if from_client {
            // A pickup (no SYN): it finds its own reverse entry among its candidates.
            let (verdict, out) = c.client(ACK);
            assert_eq!(verdict, XDP_TX);
            assert_eq!(nat_target(&out), (backend, port), "same backend, same port");
        } else {
            let (verdict, _) = c.backend(ACK);
            assert_eq!(verdict, XDP_TX, "the reply rebuilds the flow");
            assert_eq!(c.client(ACK).0, XDP_TX);
        }
        assert_eq!(w.dataplane.event(Event::ForwardRecovered).unwrap(), 1);
        assert_eq!(w.dataplane.event(Event::NatPortCollision).unwrap(), 0);
        let entries = w.dataplane.reverse_entries().unwrap();
        assert_eq!(entries.len(), 1, "no second port");
        assert_eq!(entries[0].1.flow, key);
        let flows = w.dataplane.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].1.nat_port, ha_common::port_to_wire(port));
    }
}

/// Issue 12, case 4, the other half: reverse entries whose flow is gone were
/// never swept (the sweep walked the connection table only) and, pinned,
/// survived restarts. Now the sweep frees them, past a one-second grace.
#[test]
fn the_sweep_frees_orphaned_reverse_entries_and_restores_lost_ones() {
    let mut w = world();
    let mut keys = Vec::new();
    for port in [CLIENT_PORT, CLIENT_PORT + 1] {
        let c = Conversation::new(&w, port);
        c.handshake();
        keys.push(c.key());
    }
    let entries = w.dataplane.reverse_entries().unwrap();
    let orphaned = entries.iter().find(|(_, e)| e.flow == keys[0]).unwrap().0;
    let lost = entries.iter().find(|(_, e)| e.flow == keys[1]).unwrap().0;
    w.dataplane.remove_flow(&keys[0]).unwrap();
    w.dataplane.remove_reverse_entry(&lost).unwrap();
    let report = w.dataplane.sweep_flows(T0).unwrap();
    assert_eq!(
        (report.orphans_freed, report.reverse_recovered),
        (0, 1),
        "within the grace an entry may be a flow being created"
    );
    let report = w.dataplane.sweep_flows(T0 + SECOND + 1).unwrap();
    assert_eq!((report.orphans_freed, report.reverse_recovered), (1, 0));
    let entries = w.dataplane.reverse_entries().unwrap();
    assert!(entries.iter().all(|(k, _)| *k != orphaned), "orphan freed");
    assert!(
        entries.iter().any(|(k, e)| *k == lost && e.flow == keys[1]),
        "lost one restored"
    );
    let totals = w.dataplane.sweep_totals();
    assert_eq!((totals.orphans_freed, totals.reverse_recovered), (1, 1));
}

/// An ICMP message in a frame, built by etherparse (which computes the IPv4
/// and ICMP checksums). `generated`: as the balancer builds its own errors
/// (no DF, precedence "internetwork control").
#[allow(clippy::too_many_arguments)]
fn icmp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    generated: bool,
    icmp: etherparse::Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut ip = etherparse::Ipv4Header::new(
        0,
        ttl,
        etherparse::IpNumber::ICMP,
        src.octets(),
        dst.octets(),
    )
    .unwrap();
    if generated {
        ip.dont_fragment = false;
        ip.dscp = etherparse::Ipv4Dscp::try_new(0xc0 >> 2).unwrap();
    }
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(icmp)
        .write(&mut out, quote)
        .unwrap();
    out
}

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
