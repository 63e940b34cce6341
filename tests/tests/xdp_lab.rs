//! The XDP program attached in native mode to a lab host's veth, counting
//! real packets sent by another host (nothing configured: everything passes).

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use ha_common::{Counter, Verdict};
use ha_lab::{HOST_IFACE, Lab};
use ha_user::dataplane::{AttachMode, AttachedMode, DataPlane, DataPlaneError, LoadOptions};

const UDP_PAYLOAD: usize = 100;
const UDP_FRAME: u64 = 14 + 20 + 8 + UDP_PAYLOAD as u64;

fn verdicts(dataplane: &DataPlane) -> Vec<(Verdict, Counter)> {
    dataplane.verdicts().expect("reading counters")
}

#[test]
fn native_xdp_counts_real_packets_sent_by_another_host() {
    let lab = Lab::new(&["client", "lb"]).unwrap();
    let lb = lab.host("lb").addr;
    let options = LoadOptions {
        host_ports: None,
        accept_flow_loss: false,
        maglev_table_size: 1009,
        max_vips: 1,
        max_flows: 1024,
        pin_dir: None,
    };
    let mut dataplane = DataPlane::load(&options).expect("loading");
    let mode = lab
        .in_host("lb", || dataplane.attach(HOST_IFACE, AttachMode::Native))
        .unwrap()
        .expect("native attach to a veth");
    assert_eq!(mode, AttachedMode::Native);

    // Resolve ARP first so the counted traffic below is only what we send.
    lab.exec("client", &["ping", "-c", "1", "-W", "1", &lb.to_string()])
        .unwrap();
    let before = verdicts(&dataplane);

    const DATAGRAMS: u64 = 50;
    const CONNECTS: u64 = 7;
    const PINGS: u64 = 5;
    lab.in_host("client", || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..DATAGRAMS {
            socket.send_to(&[0xab; UDP_PAYLOAD], (lb, 9999)).unwrap();
        }
        for _ in 0..CONNECTS {
            // Nothing listens: each connect is one SYN in, one RST out (not seen by XDP).
            let refused =
                TcpStream::connect_timeout(&SocketAddr::from((lb, 7777)), Duration::from_secs(1));
            assert!(refused.is_err());
        }
    })
    .unwrap();
    lab.exec(
        "client",
        &[
            "ping",
            "-c",
            &PINGS.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            &lb.to_string(),
        ],
    )
    .unwrap();

    let delta = |after: &[(Verdict, Counter)], verdict: Verdict| {
        let (a, b) = (after[verdict as usize].1, before[verdict as usize].1);
        (a.packets - b.packets, a.bytes - b.bytes)
    };
    lab.wait_until(Duration::from_secs(5), "all UDP datagrams counted", || {
        delta(&verdicts(&dataplane), Verdict::PassUdp).0 >= DATAGRAMS
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let after = verdicts(&dataplane);
    assert_eq!(
        delta(&after, Verdict::PassUdp),
        (DATAGRAMS, DATAGRAMS * UDP_FRAME),
        "udp"
    );
    assert_eq!(delta(&after, Verdict::PassTcp).0, CONNECTS, "tcp SYNs");
    assert_eq!(
        delta(&after, Verdict::PassIcmp).0,
        PINGS,
        "icmp echo requests"
    );
    assert_eq!(delta(&after, Verdict::PassMalformed).0, 0, "malformed");

    lab.in_host("lb", || dataplane.detach()).unwrap().unwrap();
    let link = lab.exec("lb", &["ip", "link", "show", HOST_IFACE]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "detached"
    );
}

/// The program must stay well inside what the kernel's verifier accepts:
/// it walks every path, and a program near its limit of 1,000,000 processed
/// instructions takes seconds to load and breaks with the next branch added.
#[test]
fn the_program_verifies_well_within_the_kernels_limits() {
    let started = std::time::Instant::now();
    let dataplane = DataPlane::load(&LoadOptions {
        host_ports: None,
        accept_flow_loss: false,
        maglev_table_size: 1009,
        max_vips: 1,
        max_flows: 1024,
        pin_dir: None,
    })
    .expect("loading");
    let info = dataplane.program().info().expect("program info");
    let verified = info
        .verified_instruction_count()
        .expect("the kernel reports verified instructions (5.16+)");
    eprintln!(
        "the verifier processed {verified} instructions; loading took {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        verified < 250_000,
        "{verified} instructions processed by the verifier (limit 1,000,000)"
    );
}

/// The pinned tables go together: flows name backends by id and pair with
/// reverse entries. A new `max_flows` migrates them (entries copied into
/// tables of the new size); when one cannot be adopted (here it is missing)
/// none is, and while they hold flows that needs the operator's consent:
/// without it loading is refused and changes nothing.
#[test]
fn pinned_tables_are_adopted_together_or_not_at_all() {
    use ha_common::{FLOW_ASSURED, Flow, FlowKey, PROTO_TCP};
    use ha_user::{
        config::DataPlaneConfig,
        dataplane::{DesiredBackend, DesiredVip},
    };
    use std::net::Ipv4Addr;

    let lab = Lab::new(&["lb"]).unwrap();
    let pins = lab.bpffs().unwrap().join("pins");
    let options = |max_flows, accept_flow_loss| LoadOptions {
        host_ports: None,
        accept_flow_loss,
        maglev_table_size: 1009,
        max_vips: 1,
        max_flows,
        pin_dir: Some(pins.clone()),
    };
    let backend = (Ipv4Addr::new(10, 99, 0, 11), 6443);
    let key = FlowKey {
        src_addr: u32::from_ne_bytes([10, 99, 0, 50]),
        dst_addr: u32::from_ne_bytes([10, 99, 0, 100]),
        src_port: 40000u16.to_be(),
        dst_port: 6443u16.to_be(),
        protocol: PROTO_TCP,
        ..FlowKey::default()
    };
    let flow;
    {
        let mut dataplane = DataPlane::load(&options(1024, false)).unwrap();
        let vip = DesiredVip {
            name: "api".into(),
            address: Ipv4Addr::new(10, 99, 0, 100).into(),
            port: 6443,
            protocol: PROTO_TCP,
            enabled: true,
            backends: vec![DesiredBackend {
                address: backend.0.into(),
                port: backend.1,
                weight: 1,
                local: false,
                down: false,
            }],
        };
        let settings = DataPlaneConfig::default()
            .settings(Ipv4Addr::new(10, 99, 0, 2).into())
            .unwrap();
        dataplane.apply(&settings, &[vip]).unwrap();
        let id = dataplane.backend_id_of(backend.0, backend.1).unwrap();
        flow = Flow {
            backend_id: id,
            flags: FLOW_ASSURED,
            ..Flow::default()
        };
        dataplane.insert_flow(&key, &flow).unwrap();
    }
    {
        let dataplane = DataPlane::load(&options(1024, false)).unwrap();
        assert_eq!(dataplane.flows().unwrap().len(), 1, "same size: adopted");
        assert!(dataplane.backend_id_of(backend.0, backend.1).is_some());
    }
    {
        // Another size: the flows are copied into new tables.
        let dataplane = DataPlane::load(&options(2048, false)).unwrap();
        assert_eq!(dataplane.flows().unwrap(), vec![(key, flow)], "migrated");
        assert!(dataplane.backend_id_of(backend.0, backend.1).is_some());
    }
    // A table missing (here the reverse NAT table): the others hold flows
    // that cannot be adopted without it.
    std::fs::remove_file(pins.join("REVERSE_NAT")).unwrap();
    let refused = DataPlane::load(&options(2048, false)).err().unwrap();
    assert!(
        matches!(refused, DataPlaneError::WouldDropFlows(ref w) if w.flows == 1),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("REVERSE_NAT is missing"),
        "{refused}"
    );
    {
        // Refused, and nothing changed.
        assert!(pins.join("CONNTRACK").exists() && pins.join("BACKENDS").exists());
    }
    let dataplane = DataPlane::load(&options(2048, true)).unwrap();
    assert!(
        dataplane.flows().unwrap().is_empty(),
        "accepted: not adopted"
    );
    assert_eq!(
        dataplane.backend_id_of(backend.0, backend.1),
        None,
        "nor the backend table that went with it"
    );
}
