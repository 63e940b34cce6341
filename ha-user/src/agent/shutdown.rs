//! Reset on mark-down (haproxy's `on-marked-down shutdown-sessions`;
//! docs/health-checks.md, "Reset on mark-down"): when a backend's check
//! marks it down as dead, each of its established TCP flows is reset
//! towards its client at once.
//!
//! The data path keeps no sequence numbers, and a reset the client accepts
//! must carry exactly the next sequence number it expects (RFC 5961 section
//! 3.2). So the agent makes the client tell it: it sends the client, from
//! the VIP, a bare ACK whose sequence number is outside the client's
//! window. The client answers such a segment with an ACK of its own (RFC
//! 9293 section 3.10.7.4; Linux `tcp_send_dupack`), carrying its current
//! sequence and acknowledgement numbers. That ACK meets the data path's rule
//! for a flow whose backend is down: the flow moves to a live backend,
//! which has no such connection and answers with a reset whose sequence
//! number is the ACK's acknowledgement number (RFC 9293 section 3.5.2): the
//! one the client expects. The client's connection is reset within a round
//! trip, and it reconnects through the VIP to a live backend.
//!
//! Pure: which flows, and the segment's bytes. Effect: one raw socket.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use ha_common::{FlowState, PROTO_TCP};

use crate::{dataplane::FlowView, inet};

/// The flows to reset when `backend` is marked down: its TCP flows that are
/// not closed, as (VIP address and port, client address and port).
pub fn flows_to_reset(
    flows: &[FlowView],
    backend: SocketAddrV4,
) -> Vec<(SocketAddrV4, SocketAddrV4)> {
    flows
        .iter()
        .filter(|f| {
            f.protocol == PROTO_TCP && f.backend == Some(backend) && f.state != FlowState::Closed
        })
        .map(|f| (f.vip, f.client))
        .collect()
}

/// The sequence number of the challenge: any value outside the client's
/// window does; this one is fixed so tests can recognise the segment (a
/// window holds at most 2^30 bytes of the 2^32 sequence space, so a
/// client's window includes a given number with odds of at most 1 in 4,
/// and then the client still answers: an acknowledgement of 0 is not
/// acceptable either, and Linux answers that with an ACK too).
pub const CHALLENGE_SEQ: u32 = 0x6861_6c62;

/// The IPv4 + TCP bytes of the challenge from `vip` to `client`: a bare ACK
/// (20-byte headers, no options, no payload), TTL 64, DF, checksums filled in.
pub fn challenge_segment(vip: SocketAddrV4, client: SocketAddrV4) -> [u8; 40] {
    let mut packet = [0u8; 40];
    // IPv4: version 4, IHL 5; total length 40; DF; TTL 64; TCP.
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&40u16.to_be_bytes());
    packet[6] = 0x40;
    packet[8] = 64;
    packet[9] = PROTO_TCP;
    packet[12..16].copy_from_slice(&vip.ip().octets());
    packet[16..20].copy_from_slice(&client.ip().octets());
    let ip_sum = inet::checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    // TCP: ports, sequence number, acknowledgement 0, data offset 5, ACK, window.
    let tcp = &mut packet[20..];
    tcp[0..2].copy_from_slice(&vip.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&client.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&CHALLENGE_SEQ.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = ha_common::TCP_ACK;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let pseudo = inet::pseudo_header_sum(*vip.ip(), *client.ip(), PROTO_TCP, 20);
    let tcp_sum = inet::finish(inet::sum16(pseudo, tcp));
    tcp[16..18].copy_from_slice(&tcp_sum.to_be_bytes());
    packet
}

/// A raw IPv4 socket that sends packets with their own header
/// (`IPPROTO_RAW` implies `IP_HDRINCL`). Needs `CAP_NET_RAW`.
pub struct ChallengeSocket(OwnedFd);

impl ChallengeSocket {
    /// # Errors
    /// `socket(2)`'s (`EPERM` without `CAP_NET_RAW`).
    pub fn open() -> io::Result<ChallengeSocket> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd nothing else owns.
        Ok(ChallengeSocket(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends the challenge from `vip` to `client`.
    ///
    /// # Errors
    /// `sendto(2)`'s (no route, a full buffer).
    pub fn send(&self, vip: SocketAddrV4, client: SocketAddrV4) -> io::Result<()> {
        let packet = challenge_segment(vip, client);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(client.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address outlive the call; sizes are theirs.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The address a client is reached at, for logs.
pub fn describe(flows: &[(SocketAddrV4, SocketAddrV4)]) -> String {
    let clients: Vec<Ipv4Addr> = flows.iter().map(|(_, c)| *c.ip()).collect();
    let mut unique = clients.clone();
    unique.sort();
    unique.dedup();
    format!("{} flows of {} clients", flows.len(), unique.len())
}

impl super::Agent {
    /// Resets the established TCP flows of the backend `key` towards their
    /// clients, if its VIP says `shutdown-sessions` and this host holds the
    /// VIPs (a backup's table has no live flows to reset). Called after the
    /// data plane has the backend down, so the clients' answers move.
    pub(super) fn reset_sessions_of(&mut self, key: &super::decide::BackendKey) {
        let Some(vip) = self.config.vips.iter().find(|v| v.name == key.vip) else {
            return;
        };
        if vip.on_marked_down != crate::config::OnMarkedDown::ShutdownSessions || !self.holding {
            return;
        }
        let std::net::IpAddr::V4(address) = key.address else {
            return;
        };
        let backend = SocketAddrV4::new(address, key.port);
        let flows = match self.dataplane.flow_views() {
            Ok(views) => flows_to_reset(&views, backend),
            Err(e) => {
                tracing::warn!(backend = %key, error = %e, "reset on mark-down: reading the flow table");
                return;
            }
        };
        if flows.is_empty() {
            return;
        }
        let socket = match ChallengeSocket::open() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::warn!(backend = %key, error = %e, "reset on mark-down: opening a raw socket");
                return;
            }
        };
        let failed = flows
            .iter()
            .filter(|(vip, client)| socket.send(*vip, *client).is_err())
            .count();
        self.sessions_reset += (flows.len() - failed) as u64;
        tracing::warn!(
            backend = %key,
            flows = flows.len(),
            failed,
            "backend marked down: resetting its established flows towards their clients ({})",
            describe(&flows)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(backend: SocketAddrV4, protocol: u8, state: FlowState, client_port: u16) -> FlowView {
        FlowView {
            client: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 50), client_port),
            vip: SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 6443),
            protocol,
            backend: Some(backend),
            nat_source: None,
            state,
            last_seen_ns: 0,
        }
    }

    #[test]
    fn the_live_tcp_flows_of_the_backend_are_reset_and_no_other() {
        let dead = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 6443);
        let live = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 12), 6443);
        let flows = [
            view(dead, PROTO_TCP, FlowState::Established, 1),
            view(dead, PROTO_TCP, FlowState::New, 2),
            view(dead, PROTO_TCP, FlowState::Closing, 3),
            view(dead, PROTO_TCP, FlowState::Closed, 4),
            view(dead, ha_common::PROTO_UDP, FlowState::Established, 5),
            view(live, PROTO_TCP, FlowState::Established, 6),
        ];
        let ports: Vec<u16> = flows_to_reset(&flows, dead)
            .iter()
            .map(|(vip, client)| {
                assert_eq!(vip.port(), 6443);
                client.port()
            })
            .collect();
        assert_eq!(ports, [1, 2, 3]);
    }

    #[test]
    fn the_challenge_is_a_bare_out_of_window_ack_from_the_vip_with_valid_checksums() {
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 8443);
        let client = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 7), 40_000);
        let p = challenge_segment(vip, client);
        assert_eq!(inet::checksum(&p[..20]), 0, "IPv4 header checksum");
        let pseudo = inet::pseudo_header_sum(*vip.ip(), *client.ip(), PROTO_TCP, 20);
        assert_eq!(
            inet::finish(inet::sum16(pseudo, &p[20..])),
            0,
            "TCP checksum"
        );
        assert_eq!(&p[12..16], &[10, 0, 0, 100]);
        assert_eq!(&p[16..20], &[192, 0, 2, 7]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 8443);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 40_000);
        assert_eq!(
            u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
            CHALLENGE_SEQ
        );
        assert_eq!(
            p[33],
            ha_common::TCP_ACK,
            "ACK only: no RST, no SYN, no data"
        );
        assert_eq!(p.len(), 40);
    }
}
