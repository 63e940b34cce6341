//! BPF_PROG_TEST_RUN of the XDP program: crafted frames in, verdict, output
//! bytes and counters checked. Needs root (loading BPF programs).

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{PacketBuilder, VlanId};
use ha_common::{ProtoCounter, ProtoIndex};
use ha_user::dataplane::DataPlane;

const XDP_PASS: u32 = 2;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT: [u8; 4] = [10, 0, 0, 1];
const LB: [u8; 4] = [10, 0, 0, 2];

fn tcp_syn() -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, LB, 64)
        .tcp(40000, 6443, 1, 64240)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).unwrap();
    frame
}

fn vlan_udp(payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .single_vlan(VlanId::try_new(205).unwrap())
        .ipv4(CLIENT, LB, 64)
        .udp(5000, 53);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).unwrap();
    frame
}

fn arp_request() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&CLIENT_MAC);
    frame.extend_from_slice(&CLIENT);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&LB);
    frame
}

/// Runs one frame through the program; returns the verdict and the output frame.
fn run_once(dataplane: &DataPlane, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let mut options = TestRunOptions::new();
    options.data_in = Some(frame);
    options.data_out = Some(&mut out);
    let result = dataplane
        .program()
        .test_run(options)
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn counter(dataplane: &DataPlane, index: ProtoIndex) -> ProtoCounter {
    dataplane.proto_counters().expect("reading counters")[index as usize]
}

#[test]
fn each_frame_class_is_passed_unchanged_and_counted_once() {
    let dataplane = DataPlane::load().expect("loading the XDP program");
    let cases: Vec<(&str, Vec<u8>, ProtoIndex)> = vec![
        ("TCP SYN", tcp_syn(), ProtoIndex::Tcp),
        ("802.1Q-tagged UDP", vlan_udp(b"hello"), ProtoIndex::Udp),
        ("ARP request", arp_request(), ProtoIndex::NonIpv4),
        // Cut inside the IPv4 header: the EtherType says IPv4, the bytes are not there.
        (
            "IPv4 truncated to 20 bytes",
            tcp_syn()[..20].to_vec(),
            ProtoIndex::Malformed,
        ),
    ];
    for (name, frame, class) in cases {
        let before = counter(&dataplane, class);
        let (verdict, out) = run_once(&dataplane, &frame);
        assert_eq!(verdict, XDP_PASS, "{name}: verdict");
        assert_eq!(out, frame, "{name}: a passed frame leaves unchanged");
        let after = counter(&dataplane, class);
        assert_eq!(after.packets, before.packets + 1, "{name}: packet counter");
        assert_eq!(
            after.bytes,
            before.bytes + frame.len() as u64,
            "{name}: byte counter"
        );
    }
    // Nothing was counted twice or in the wrong slot: the totals add up to the four frames.
    let totals = dataplane.proto_counters().unwrap();
    let packets: u64 = totals.iter().map(|c| c.packets).sum();
    assert_eq!(packets, 4, "{totals:?}");
}

#[test]
fn ipv4_header_length_below_twenty_bytes_is_malformed() {
    let dataplane = DataPlane::load().expect("loading the XDP program");
    let mut frame = tcp_syn();
    frame[14] = 0x44; // version 4, IHL 4 words = 16 bytes: impossible
    let (verdict, _) = run_once(&dataplane, &frame);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(counter(&dataplane, ProtoIndex::Malformed).packets, 1);
    assert_eq!(counter(&dataplane, ProtoIndex::Tcp).packets, 0);
}
