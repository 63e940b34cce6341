//! BPF_PROG_TEST_RUN fixture table, in the style of Katran's tester: each case
//! is a name, an input frame built here, the expected verdict and the
//! expected output frame. Expected frames are built with etherparse
//! (`ha_lab::packet`), which computes every checksum itself: an independent
//! implementation, not the code under test.
//!
//! The program runs inside a lab host's namespace with `ingress_ifindex` set
//! to its eth0, so `bpf_fib_lookup` answers from a real routing table and
//! real (permanent) neighbour entries.
//!
//! This file is the harness (the world, the frames' addresses, the case
//! table runner, a flow's conversation); the cases are split by feature:
//! `nat`, `parse`, `conntrack`, `sweep`, `icmp`, `local` (local backends: the
//! XDP translation and the tc egress program) and `passive` (passive health,
//! L4 redispatch).

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{SlicedPacket, TransportSlice};
use ha_common::{
    Event, FlowKey, NatEntry, NatKey, PROTO_TCP, PROTO_UDP, Verdict, addr_to_wire, hash,
    port_to_wire,
};
use ha_lab::{
    Lab,
    packet::{ACK, FIN, Frame, L4, RST, SYN, SYN_ACK, UDP, UDP_NO_CHECKSUM, icmp_frame},
};
use ha_user::{
    config::DataPlaneConfig,
    dataplane::{DataPlane, DesiredBackend, DesiredVip, LoadOptions},
};

mod conntrack;
mod icmp;
mod local;
mod nat;
mod parse;
mod passive;
mod sweep;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TABLE_SIZE: u32 = 1009;
const NAT_MIN: u16 = 20000;
const NAT_MAX: u16 = 20999;
const CLIENT_PORT: u16 = 40001;
/// The port of the local VIP's backend (this host).
const LOCAL_PORT: u16 = 7443;
/// The virtual clock every packet sees at the start (`Settings::clock_ns`).
const T0: u64 = 1_000_000 * SECOND;
const SECOND: u64 = 1_000_000_000;

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
    /// The stacked layout's VIP: this host's backend (on `LOCAL_PORT`) and
    /// the three others.
    stacked_vip: Ipv4Addr,
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
    let stacked_vip = lab.vip(6);
    let one = |address: Ipv4Addr, local: bool| {
        vec![DesiredBackend {
            address: address.into(),
            // The local backend listens on another port than its VIP's (as an
            // apiserver on 6443 behind a VIP on 8443): translated too.
            port: if local { LOCAL_PORT } else { 6443 },
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
        vip(
            "stacked",
            stacked_vip,
            6443,
            PROTO_TCP,
            one(lb, true)
                .into_iter()
                .chain(backends(&lab, 6443))
                .collect(),
        ),
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
        stacked_vip,
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

    /// Runs one packet through the tc egress program: (return value, packet as it leaves).
    fn run_egress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.lab
            .in_host("lb", || {
                let mut out = vec![0u8; frame.len() + 256];
                let mut options = TestRunOptions::new();
                options.data_in = Some(frame);
                options.data_out = Some(&mut out);
                let result = self
                    .dataplane
                    .egress_program()
                    .test_run(options)
                    .expect("BPF_PROG_TEST_RUN (tc)");
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

/// The backend a NATed frame was sent to: (destination address, source port).
fn nat_target(frame: &[u8]) -> (Ipv4Addr, u16) {
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    (dst, u16::from_be_bytes([frame[34], frame[35]]))
}
