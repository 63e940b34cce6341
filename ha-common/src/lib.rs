//! Types shared by the XDP program (`ha-ebpf`) and the agent (`ha-user`).
//!
//! Every type here crosses the kernel boundary as raw bytes, so each one is
//! `#[repr(C)]`, has its padding spelled out as named fields (the verifier and
//! hash maps compare keys byte by byte, and uninitialised padding would make
//! two equal keys differ), and has its size checked at compile time so that a
//! change on one side cannot silently disagree with the other.
#![no_std]

/// Name of the XDP program inside the object file; the agent looks it up by this.
pub const XDP_PROGRAM_NAME: &str = "ha_xdp";

/// Name of the per-CPU array holding [`ProtoCounter`]s, indexed by [`ProtoIndex`].
pub const PROTO_COUNTERS_MAP: &str = "PROTO_COUNTERS";

/// Packet and byte totals for one class of traffic on one CPU.
///
/// Kept per CPU so the data path never contends on a shared cache line; the
/// agent sums the CPUs when it reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtoCounter {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<ProtoCounter>() == 16);

impl ProtoCounter {
    /// Adds another CPU's slot (or another sample) to this one.
    pub fn merge(&mut self, other: &ProtoCounter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

/// Slots of the per-protocol counter array.
///
/// Fixed numbering: it is the index into a kernel map, so reordering the
/// variants would make an old agent misread a new program's counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoIndex {
    /// Ethernet frames that carry something other than IPv4 (ARP, IPv6, ...).
    NonIpv4 = 0,
    Tcp = 1,
    Udp = 2,
    Icmp = 3,
    /// IPv4 with any other protocol number (VRRP, GRE, ...).
    OtherIpv4 = 4,
    /// Frames too short for the headers they announce, or with a bad IPv4 header length.
    Malformed = 5,
}

impl ProtoIndex {
    pub const COUNT: u32 = 6;
    pub const ALL: [ProtoIndex; Self::COUNT as usize] = [
        ProtoIndex::NonIpv4,
        ProtoIndex::Tcp,
        ProtoIndex::Udp,
        ProtoIndex::Icmp,
        ProtoIndex::OtherIpv4,
        ProtoIndex::Malformed,
    ];

    /// Short label for status output and metrics.
    pub const fn label(self) -> &'static str {
        match self {
            ProtoIndex::NonIpv4 => "non-ipv4",
            ProtoIndex::Tcp => "tcp",
            ProtoIndex::Udp => "udp",
            ProtoIndex::Icmp => "icmp",
            ProtoIndex::OtherIpv4 => "other-ipv4",
            ProtoIndex::Malformed => "malformed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), only u64 fields, no padding (size asserted above).
    unsafe impl aya::Pod for super::ProtoCounter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_index_values_match_their_position() {
        for (position, index) in ProtoIndex::ALL.iter().enumerate() {
            assert_eq!(*index as u32, position as u32, "{}", index.label());
        }
    }

    #[test]
    fn merge_adds_both_fields() {
        let mut total = ProtoCounter {
            packets: 1,
            bytes: 60,
        };
        total.merge(&ProtoCounter {
            packets: 2,
            bytes: 100,
        });
        assert_eq!(
            total,
            ProtoCounter {
                packets: 3,
                bytes: 160
            }
        );
    }
}
