//! VRRP on the wire: a raw IPv4 socket for protocol 112 on one interface.
//! The kernel builds the IP header; TTL 255 is set for sending and checked
//! on receipt (RFC 9568: a router must not accept adverts that were forwarded).

use std::{io, mem::MaybeUninit, net::Ipv4Addr};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::packet::{IPPROTO_VRRP, MULTICAST_GROUP};

pub struct VrrpSocket {
    socket: RawSocket,
}

/// A non-blocking raw IPv4 socket on the runtime: sends messages (the
/// kernel adds the IP header) and receives whole IPv4 packets.
pub(super) struct RawSocket(AsyncFd<Socket>);

impl RawSocket {
    pub(super) fn register(socket: Socket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        // SAFETY: the Socket owns its fd, and AsyncFd owns the Socket for its
        // whole life, so the fd stays open and the same.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(Self(socket))
    }

    pub(super) async fn send(&self, dst: Ipv4Addr, message: &[u8]) -> io::Result<()> {
        let address = SockAddr::from(std::net::SocketAddrV4::new(dst, 0));
        loop {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|s| s.get_ref().send_to(message, &address)) {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next packet, IP header included.
    pub(super) async fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        loop {
            let mut guard = self.0.readable().await?;
            let n = match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            // SAFETY: recv initialised the first n bytes.
            return Ok(buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect());
        }
    }
}

/// A received packet: the IP header's fields we check, and the VRRP message.
pub struct Received {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub message: Vec<u8>,
}

impl VrrpSocket {
    /// Opens the socket on `iface` (whose primary address is `local`); joins
    /// 224.0.0.18 there when adverts are multicast. It is not bound to an
    /// address: a raw socket bound to one would drop multicast.
    pub fn open(iface: &str, local: Ipv4Addr, multicast: bool) -> io::Result<Self> {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(IPPROTO_VRRP as i32)),
        )?;
        socket.bind_device(Some(iface.as_bytes()))?;
        socket.set_ttl_v4(255)?;
        socket.set_multicast_ttl_v4(255)?;
        socket.set_multicast_loop_v4(false)?;
        socket.set_multicast_if_v4(&local)?;
        if multicast {
            socket.join_multicast_v4(&MULTICAST_GROUP, &local)?;
        }
        Ok(Self {
            socket: RawSocket::register(socket)?,
        })
    }

    pub async fn send(&self, dst: Ipv4Addr, message: &[u8]) -> io::Result<()> {
        self.socket.send(dst, message).await
    }

    pub async fn recv(&self) -> io::Result<Received> {
        loop {
            let packet = self.socket.recv().await?;
            if packet.len() < 20 || packet[0] >> 4 != 4 {
                continue;
            }
            let header_len = ((packet[0] & 0x0f) as usize) * 4;
            if packet.len() < header_len {
                continue;
            }
            return Ok(Received {
                ttl: packet[8],
                src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
                dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
                message: packet[header_len..].to_vec(),
            });
        }
    }
}
