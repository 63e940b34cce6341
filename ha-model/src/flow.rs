//! **The flow state machine** (docs/data-path.md, "The flow state machine" and "Which packet
//! does what to a flow"): states from flag bits, timeouts, expiry, evictability, the TCP
//! valid-flags table, and the bits each packet adds.
//!
//! Everything here is a pure function of its arguments.

use ha_common::{
    FLOW_ASSURED, FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_LOCAL, FLOW_RESET, FLOW_SEEN_REPLY, Flow,
    LAST_SEEN_GRANULARITY_NS, PROTO_TCP, Settings, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TCP_URG,
    TIMEOUT_TCP_CLOSED, TIMEOUT_TCP_CLOSING, TIMEOUT_TCP_EMBRYONIC, TIMEOUT_TCP_ESTABLISHED,
    TIMEOUT_UDP_ESTABLISHED, TIMEOUT_UDP_UNREPLIED,
};

/// A flow's state, derived from its bits ("first rule that matches").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `RESET`, or both FIN bits.
    Closed,
    /// `SYN_SENT`: neither `ASSURED` nor `SEEN_REPLY`.
    New,
    /// `SYN_RECV`: `SEEN_REPLY`, not `ASSURED`.
    Replied,
    /// `ASSURED` and one FIN bit.
    Closing,
    /// `ASSURED`.
    Established,
}

impl Phase {
    /// The state of a flow with these `flags`.
    pub fn of(flags: u32) -> Phase {
        let has = |bit: u32| flags & bit != 0;
        let fins = (has(FLOW_FIN_CLIENT), has(FLOW_FIN_BACKEND));
        if has(FLOW_RESET) || fins == (true, true) {
            Phase::Closed
        } else if !has(FLOW_ASSURED) {
            if has(FLOW_SEEN_REPLY) {
                Phase::Replied
            } else {
                Phase::New
            }
        } else if fins != (false, false) {
            Phase::Closing
        } else {
            Phase::Established
        }
    }

    /// *Embryonic* = new or replied.
    pub fn is_embryonic(self) -> bool {
        matches!(self, Phase::New | Phase::Replied)
    }
}

/// *Evictable*: not `ASSURED`, or closed (local or not: a local flow is assured by both sides,
/// its backend's packets being seen by the tc egress program).
pub fn is_evictable(flags: u32) -> bool {
    flags & FLOW_ASSURED == 0 || Phase::of(flags) == Phase::Closed
}

/// Whether a flow has a reverse entry to keep: not `LOCAL`, or a local flow whose NAT source
/// is its client's own address and port (a *translated* local flow; one created by a program
/// that passed local flows untranslated has NAT source 0:0).
pub fn has_reverse(key: &ha_common::FlowKey, flow: &Flow) -> bool {
    flow.flags & FLOW_LOCAL == 0 || (flow.nat_addr == key.src_addr && flow.nat_port == key.src_port)
}

/// **Timeout** of a flow of `protocol` with `flags`, from the table in the spec.
///
/// Any protocol other than TCP uses the UDP row (no other protocol ever has a flow). UDP never
/// gets FIN or RST bits, so the table leaves its closing and closed cells empty ("-"); this
/// model gives them the timeout of their `ASSURED` bit: a closing flow (assured)
/// `udp_idle_timeout`, a closed one `udp_idle_timeout` if assured, else
/// `udp_unreplied_timeout`.
pub fn timeout_ns(protocol: u8, flags: u32, settings: &Settings) -> u64 {
    let phase = Phase::of(flags);
    let slot = if protocol == PROTO_TCP {
        match phase {
            Phase::New | Phase::Replied => TIMEOUT_TCP_EMBRYONIC,
            Phase::Established => TIMEOUT_TCP_ESTABLISHED,
            Phase::Closing => TIMEOUT_TCP_CLOSING,
            Phase::Closed => TIMEOUT_TCP_CLOSED,
        }
    } else if flags & FLOW_ASSURED != 0 {
        TIMEOUT_UDP_ESTABLISHED
    } else {
        TIMEOUT_UDP_UNREPLIED
    };
    settings.timeouts_ns[slot]
}

/// **Expired** at `now`: `now > last_seen_ns + timeout + G` (sums saturate).
pub fn is_expired(flow: &Flow, protocol: u8, settings: &Settings, now: u64) -> bool {
    let deadline = flow
        .last_seen_ns
        .saturating_add(timeout_ns(protocol, flow.flags, settings))
        .saturating_add(LAST_SEEN_GRANULARITY_NS);
    now > deadline
}

/// Whether `flow` *names* the reverse entry at NAT `(nat_addr, nat_port)` for `backend_id`:
/// its `nat_addr`, `nat_port` and `backend_id` are those (the spec's parenthesised list; the
/// `LOCAL` bit is not part of it, and is checked separately where the spec says so).
pub fn names(flow: &Flow, nat_addr: u32, nat_port: u16, backend_id: u32) -> bool {
    flow.nat_addr == nat_addr && flow.nat_port == nat_port && flow.backend_id == backend_id
}

/// TCP flags are *valid* when `flags & (FIN|SYN|RST|ACK|URG)` is one of the nine combinations
/// of Linux conntrack's `tcp_valid_flags`.
pub fn tcp_flags_valid(flags: u8) -> bool {
    const SA: u8 = TCP_SYN | TCP_ACK;
    const SU: u8 = TCP_SYN | TCP_URG;
    const RA: u8 = TCP_RST | TCP_ACK;
    const FA: u8 = TCP_FIN | TCP_ACK;
    const FAU: u8 = TCP_FIN | TCP_ACK | TCP_URG;
    const AU: u8 = TCP_ACK | TCP_URG;
    matches!(
        flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG),
        TCP_SYN | SU | SA | TCP_RST | RA | FA | FAU | TCP_ACK | AU
    )
}

/// A *bare SYN*: SYN set, ACK and RST clear. (UDP's flags, 0, are never one.)
pub fn is_bare_syn(flags: u8) -> bool {
    flags & TCP_SYN != 0 && flags & (TCP_ACK | TCP_RST) == 0
}

/// **Client packet** with TCP `flags` (0 for UDP) to a flow with bits `b`: the bits to add.
pub fn client_bits(b: u32, flags: u8) -> u32 {
    if flags & TCP_RST != 0 {
        return FLOW_RESET;
    }
    let mut add = 0;
    if flags & TCP_FIN != 0 {
        add |= FLOW_FIN_CLIENT;
    }
    if !is_bare_syn(flags) && b & FLOW_SEEN_REPLY != 0 {
        add |= FLOW_ASSURED;
    }
    add
}

/// **Backend packet** (a reply) with TCP `flags`: the bits to add.
pub fn backend_bits(flags: u8) -> u32 {
    if flags & TCP_RST != 0 {
        FLOW_RESET
    } else if flags & TCP_FIN != 0 {
        FLOW_SEEN_REPLY | FLOW_FIN_BACKEND
    } else {
        FLOW_SEEN_REPLY
    }
}

/// **First packet**: the client rule on `b = 0` (or `LOCAL`) without `SEEN_REPLY` and `ASSURED`:
/// `RESET` for an RST, `FIN_CLIENT` for a FIN, nothing otherwise (`LOCAL` not included).
pub fn first_packet_bits(flags: u8) -> u32 {
    client_bits(0, flags) & !(FLOW_SEEN_REPLY | FLOW_ASSURED)
}

/// **Refresh** `flow` with the bits `add` at `now`; returns whether the packet *refreshed* it
/// (either write happened).
///
/// - the bits change the flow: `last_seen_ns = now`, then the bits are ORed in;
/// - else, `now > last_seen_ns + G`: `last_seen_ns = now`;
/// - else nothing.
pub fn refresh(flow: &mut Flow, add: u32, now: u64) -> bool {
    if flow.flags | add != flow.flags {
        flow.last_seen_ns = now;
        flow.flags |= add;
        true
    } else if now > flow.last_seen_ns.saturating_add(LAST_SEEN_GRANULARITY_NS) {
        flow.last_seen_ns = now;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ha_common::{PROTO_UDP, TCP_PSH};

    const G: u64 = LAST_SEEN_GRANULARITY_NS;
    const EST: u32 = FLOW_SEEN_REPLY | FLOW_ASSURED;

    fn settings() -> Settings {
        Settings {
            timeouts_ns: ha_common::Timeouts {
                tcp_syn_ns: 60 * G,
                tcp_established_ns: 3600 * G,
                tcp_closing_ns: 120 * G,
                tcp_closed_ns: 5 * G,
                udp_unreplied_ns: 30 * G,
                udp_established_ns: 60 * G,
            }
            .table(),
            ..Settings::default()
        }
    }

    #[test]
    fn all_256_flag_bytes_against_the_table() {
        let table: [(u8, &str); 9] = [
            (0x02, "SYN"),
            (0x22, "SYN|URG"),
            (0x12, "SYN|ACK"),
            (0x04, "RST"),
            (0x14, "RST|ACK"),
            (0x11, "FIN|ACK"),
            (0x31, "FIN|ACK|URG"),
            (0x10, "ACK"),
            (0x30, "ACK|URG"),
        ];
        let mut valid = 0;
        for byte in 0..=255u8 {
            let relevant = byte & 0x37;
            let expected = table.iter().any(|(bits, _)| *bits == relevant);
            assert_eq!(tcp_flags_valid(byte), expected, "{byte:#04x}");
            valid += usize::from(expected);
        }
        // Nine combinations, each with PSH, ECE, CWR free: 9 * 8.
        assert_eq!(valid, 72);
        assert!(tcp_flags_valid(TCP_ACK | TCP_PSH | 0xc0));
        for invalid in [
            0u8,
            TCP_FIN,
            TCP_SYN | TCP_FIN,
            TCP_SYN | TCP_RST,
            0x3f,
            TCP_URG,
        ] {
            assert!(!tcp_flags_valid(invalid), "{invalid:#04x}");
        }
    }

    #[test]
    fn bare_syn() {
        for byte in 0..=255u8 {
            let expected = byte & 0x16 == 0x02;
            assert_eq!(is_bare_syn(byte), expected, "{byte:#04x}");
        }
    }

    #[test]
    fn phases_first_rule_wins() {
        assert_eq!(Phase::of(0), Phase::New);
        assert_eq!(Phase::of(FLOW_LOCAL), Phase::New);
        assert_eq!(Phase::of(FLOW_SEEN_REPLY), Phase::Replied);
        assert_eq!(Phase::of(FLOW_ASSURED), Phase::Established);
        assert_eq!(Phase::of(EST), Phase::Established);
        assert_eq!(Phase::of(EST | FLOW_FIN_CLIENT), Phase::Closing);
        assert_eq!(Phase::of(EST | FLOW_FIN_BACKEND), Phase::Closing);
        assert_eq!(
            Phase::of(EST | FLOW_FIN_BACKEND | FLOW_FIN_CLIENT),
            Phase::Closed
        );
        assert_eq!(Phase::of(FLOW_RESET), Phase::Closed);
        assert_eq!(Phase::of(FLOW_FIN_CLIENT | FLOW_FIN_BACKEND), Phase::Closed);
        // One FIN before ASSURED stays embryonic.
        assert_eq!(Phase::of(FLOW_FIN_CLIENT), Phase::New);
        assert_eq!(
            Phase::of(FLOW_FIN_BACKEND | FLOW_SEEN_REPLY),
            Phase::Replied
        );
        assert!(Phase::of(FLOW_FIN_CLIENT).is_embryonic());
        assert!(!Phase::of(EST).is_embryonic());
    }

    #[test]
    fn evictable_is_unassured_or_closed_local_or_not() {
        for flags in 0..64u32 {
            let expected = matches!(
                Phase::of(flags),
                Phase::New | Phase::Replied | Phase::Closed
            );
            assert_eq!(is_evictable(flags), expected, "{flags:#x}");
        }
        assert!(!is_evictable(EST | FLOW_FIN_CLIENT));
        assert!(is_evictable(EST | FLOW_RESET));
        assert!(!is_evictable(EST | FLOW_LOCAL));
    }

    #[test]
    fn timeouts_per_state_and_protocol() {
        let s = settings();
        let cases: [(u8, u32, u64); 12] = [
            (PROTO_TCP, 0, 60),
            (PROTO_TCP, FLOW_FIN_CLIENT, 60),
            (PROTO_TCP, FLOW_SEEN_REPLY, 60),
            (PROTO_TCP, EST, 3600),
            (PROTO_TCP, EST | FLOW_LOCAL, 3600),
            (PROTO_TCP, EST | FLOW_FIN_BACKEND, 120),
            (PROTO_TCP, EST | FLOW_FIN_BACKEND | FLOW_FIN_CLIENT, 5),
            (PROTO_TCP, FLOW_RESET, 5),
            (PROTO_UDP, 0, 30),
            (PROTO_UDP, FLOW_SEEN_REPLY, 30),
            (PROTO_UDP, EST, 60),
            (PROTO_UDP, FLOW_LOCAL | EST, 60),
        ];
        for (protocol, flags, seconds) in cases {
            assert_eq!(timeout_ns(protocol, flags, &s), seconds * G, "{flags:#x}");
            let flow = Flow {
                flags,
                last_seen_ns: 1000 * G,
                ..Flow::default()
            };
            let edge = (1000 + seconds + 1) * G;
            assert!(!is_expired(&flow, protocol, &s, edge), "{flags:#x}");
            assert!(is_expired(&flow, protocol, &s, edge + 1), "{flags:#x}");
        }
        // Saturation: never wraps.
        let far = Flow {
            last_seen_ns: u64::MAX - 3,
            ..Flow::default()
        };
        assert!(!is_expired(&far, PROTO_TCP, &s, u64::MAX));
        let huge = Settings {
            timeouts_ns: ha_common::Timeouts {
                tcp_syn_ns: u64::MAX,
                ..ha_common::Timeouts::default()
            }
            .table(),
            ..s
        };
        assert!(!is_expired(&Flow::default(), PROTO_TCP, &huge, u64::MAX));
    }

    #[test]
    fn client_rule() {
        const SYN: u8 = TCP_SYN;
        const ACK: u8 = TCP_ACK;
        const FA: u8 = TCP_FIN | TCP_ACK;
        // RST: RESET only, whatever b.
        assert_eq!(client_bits(EST, TCP_RST | ACK), FLOW_RESET);
        assert_eq!(client_bits(FLOW_LOCAL, TCP_RST), FLOW_RESET);
        // A bare SYN adds nothing.
        assert_eq!(client_bits(FLOW_SEEN_REPLY, SYN), 0);
        assert_eq!(client_bits(FLOW_LOCAL, SYN | TCP_URG), 0);
        // ACK: ASSURED after SEEN_REPLY (local or not); nothing for new.
        assert_eq!(client_bits(0, ACK), 0);
        assert_eq!(client_bits(FLOW_SEEN_REPLY, ACK), FLOW_ASSURED);
        assert_eq!(client_bits(FLOW_LOCAL, ACK), 0);
        assert_eq!(client_bits(FLOW_LOCAL | FLOW_SEEN_REPLY, ACK), FLOW_ASSURED);
        assert_eq!(client_bits(FLOW_SEEN_REPLY, SYN | ACK), FLOW_ASSURED);
        // FIN.
        assert_eq!(client_bits(0, FA), FLOW_FIN_CLIENT);
        assert_eq!(
            client_bits(FLOW_SEEN_REPLY, FA),
            FLOW_FIN_CLIENT | FLOW_ASSURED
        );
        // UDP (flags 0).
        assert_eq!(client_bits(0, 0), 0);
        assert_eq!(client_bits(FLOW_SEEN_REPLY, 0), FLOW_ASSURED);
        assert_eq!(client_bits(FLOW_LOCAL, 0), 0);
    }

    #[test]
    fn backend_rule_and_first_packet() {
        assert_eq!(backend_bits(TCP_RST), FLOW_RESET);
        assert_eq!(backend_bits(TCP_RST | TCP_ACK), FLOW_RESET);
        assert_eq!(backend_bits(TCP_SYN | TCP_ACK), FLOW_SEEN_REPLY);
        assert_eq!(
            backend_bits(TCP_FIN | TCP_ACK),
            FLOW_SEEN_REPLY | FLOW_FIN_BACKEND
        );
        assert_eq!(backend_bits(0), FLOW_SEEN_REPLY);
        assert_eq!(first_packet_bits(TCP_SYN), 0);
        assert_eq!(first_packet_bits(TCP_ACK), 0);
        assert_eq!(first_packet_bits(TCP_SYN | TCP_ACK), 0);
        assert_eq!(first_packet_bits(TCP_RST), FLOW_RESET);
        assert_eq!(first_packet_bits(TCP_RST | TCP_ACK), FLOW_RESET);
        assert_eq!(first_packet_bits(TCP_FIN | TCP_ACK), FLOW_FIN_CLIENT);
        assert_eq!(first_packet_bits(0), 0);
    }

    fn client(flow: &mut Flow, flags: u8, now: u64) -> bool {
        let add = client_bits(flow.flags, flags);
        refresh(flow, add, now)
    }

    fn backend(flow: &mut Flow, flags: u8, now: u64) -> bool {
        refresh(flow, backend_bits(flags), now)
    }

    /// Drives a TCP flow through the diagram: new -> replied -> established -> closing -> closed.
    #[test]
    fn transitions_follow_the_diagram() {
        let mut flow = Flow {
            flags: first_packet_bits(TCP_SYN),
            last_seen_ns: 10 * G,
            ..Flow::default()
        };
        assert_eq!(Phase::of(flow.flags), Phase::New);
        // A retransmitted SYN within G: nothing written.
        assert!(!client(&mut flow, TCP_SYN, 10 * G + 5));
        assert_eq!(flow.last_seen_ns, 10 * G);
        // The backend's SYN|ACK.
        assert!(backend(&mut flow, TCP_SYN | TCP_ACK, 10 * G + 7));
        assert_eq!(Phase::of(flow.flags), Phase::Replied);
        assert_eq!(flow.last_seen_ns, 10 * G + 7);
        // The client's ACK.
        assert!(client(&mut flow, TCP_ACK, 10 * G + 9));
        assert_eq!(Phase::of(flow.flags), Phase::Established);
        // Data within G: no write; after G: a refresh of the time only.
        assert!(!client(&mut flow, TCP_ACK, 11 * G + 9));
        assert!(client(&mut flow, TCP_ACK, 11 * G + 10));
        assert_eq!(flow.last_seen_ns, 11 * G + 10);
        assert_eq!(Phase::of(flow.flags), Phase::Established);
        // FIN from the backend, then from the client.
        assert!(backend(&mut flow, TCP_FIN | TCP_ACK, 12 * G));
        assert_eq!(Phase::of(flow.flags), Phase::Closing);
        assert!(client(&mut flow, TCP_FIN | TCP_ACK, 13 * G));
        assert_eq!(Phase::of(flow.flags), Phase::Closed);
        // Time going backwards with new bits still writes now.
        let mut other = Flow {
            last_seen_ns: 100 * G,
            ..Flow::default()
        };
        assert!(refresh(&mut other, FLOW_RESET, 50 * G));
        assert_eq!(other.last_seen_ns, 50 * G);
        assert!(!refresh(&mut other, FLOW_RESET, 51 * G));
    }

    #[test]
    fn udp_and_local_transitions() {
        let mut udp = Flow::default();
        assert!(!client(&mut udp, 0, 0));
        assert_eq!(Phase::of(udp.flags), Phase::New);
        backend(&mut udp, 0, 1);
        assert_eq!(Phase::of(udp.flags), Phase::Replied);
        client(&mut udp, 0, 2);
        assert_eq!(Phase::of(udp.flags), Phase::Established);
        // A local flow: as a NATed one, its backend's answer (seen at egress) first.
        let mut local = Flow {
            flags: FLOW_LOCAL | first_packet_bits(TCP_SYN),
            ..Flow::default()
        };
        client(&mut local, TCP_ACK, 3);
        assert_eq!(local.flags, FLOW_LOCAL);
        backend(&mut local, TCP_SYN | TCP_ACK, 3);
        client(&mut local, TCP_ACK, 3);
        assert_eq!(local.flags, FLOW_LOCAL | EST);
        // RST on anything: closed.
        client(&mut local, TCP_RST, 4);
        assert_eq!(Phase::of(local.flags), Phase::Closed);
    }
}
