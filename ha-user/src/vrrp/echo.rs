//! Watching a master's host during a restart hold: ICMP echo (RFC 792) from
//! a raw socket. The codec is pure; the socket is opened only while a
//! backup watches (the machine says when: `Machine::host_to_watch`).

use std::{io, net::Ipv4Addr};

use socket2::{Domain, Protocol, Socket, Type};

use super::socket::RawSocket;

const ECHO_REQUEST: u8 = 8;
const ECHO_REPLY: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const PAYLOAD: &[u8; 8] = b"ha-lb-hw";

/// An echo request (type 8) with `id` and `seq`: the ICMP message, without
/// the IP header the kernel adds.
pub fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut message = vec![ECHO_REQUEST, 0, 0, 0];
    message.extend_from_slice(&id.to_be_bytes());
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(PAYLOAD);
    let sum = crate::inet::checksum(&message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    message
}

/// The source of an echo reply to one of our requests (`id`), from a whole
/// IPv4 packet as a raw socket receives it; `None` for anything else.
pub fn echo_reply_from(packet: &[u8], id: u16) -> Option<Ipv4Addr> {
    let header_len = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || header_len < 20 || *packet.get(9)? != IPPROTO_ICMP {
        return None;
    }
    let icmp = packet.get(header_len..)?;
    if icmp.len() < 8 || icmp[0] != ECHO_REPLY || icmp[1] != 0 || crate::inet::checksum(icmp) != 0 {
        return None;
    }
    if u16::from_be_bytes([icmp[4], icmp[5]]) != id {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[12], packet[13], packet[14], packet[15],
    ))
}

/// A raw ICMP socket: sends echo requests, receives every ICMP message the
/// host gets (the replies are picked out by id and source).
pub struct EchoSocket {
    socket: RawSocket,
}

impl EchoSocket {
    pub fn open() -> io::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
        Ok(Self {
            socket: RawSocket::register(socket)?,
        })
    }

    pub async fn send(&self, dst: Ipv4Addr, message: &[u8]) -> io::Result<()> {
        self.socket.send(dst, message).await
    }

    /// The next whole IPv4 packet received.
    pub async fn recv(&self) -> io::Result<Vec<u8>> {
        self.socket.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_packet(request: &[u8], from: Ipv4Addr) -> Vec<u8> {
        let mut icmp = request.to_vec();
        icmp[0] = ECHO_REPLY;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let sum = crate::inet::checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0];
        packet.extend_from_slice(&from.octets());
        packet.extend_from_slice(&[10, 0, 0, 2]);
        packet.extend_from_slice(&icmp);
        packet
    }

    #[test]
    fn a_request_has_a_valid_checksum_and_its_reply_is_recognised() {
        let request = echo_request(0x1234, 7);
        assert_eq!(request.len(), 16);
        assert_eq!((request[0], request[1]), (ECHO_REQUEST, 0));
        assert_eq!(
            crate::inet::checksum(&request),
            0,
            "a correct checksum sums to zero"
        );
        let from = Ipv4Addr::new(10, 0, 0, 9);
        let reply = reply_packet(&request, from);
        assert_eq!(echo_reply_from(&reply, 0x1234), Some(from));
        assert_eq!(echo_reply_from(&reply, 0x1235), None, "another id");
        let mut corrupt = reply.clone();
        corrupt[30] ^= 1;
        assert_eq!(echo_reply_from(&corrupt, 0x1234), None, "bad checksum");
        let mut request_seen = reply_packet(&request, from);
        request_seen[20] = ECHO_REQUEST;
        assert_eq!(echo_reply_from(&request_seen, 0x1234), None);
        for cut in 0..reply.len() {
            let _ = echo_reply_from(&reply[..cut], 0x1234);
        }
        assert_eq!(echo_reply_from(&reply[..27], 0x1234), None);
    }
}
