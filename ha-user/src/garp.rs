//! Gratuitous ARP: after taking a VIP, tell the LAN (switches' MAC tables,
//! clients' ARP caches) that the VIP is now at this host's MAC.
//!
//! The frame is a broadcast ARP request for the VIP from the VIP (RFC 5227
//! "ARP announcement"), the form keepalived sends and every stack accepts.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrLike, sendto,
    socket,
};

const ETH_P_ARP: u16 = 0x0806;

/// The 42-byte Ethernet + ARP announcement frame for `vip` at `mac`.
pub fn announcement(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame[18] = 6;
    frame[19] = 4;
    frame[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&vip.octets());
    frame[32..38].copy_from_slice(&[0; 6]);
    frame[38..42].copy_from_slice(&vip.octets());
    frame
}

#[derive(Debug, thiserror::Error)]
pub enum GarpError {
    #[error("sending gratuitous ARP for {vip} on interface {ifindex}: {source}")]
    Send {
        vip: Ipv4Addr,
        ifindex: u32,
        #[source]
        source: nix::Error,
    },
    /// ARP is IPv4's (IPv6 would announce with unsolicited neighbour advertisements).
    #[error("gratuitous ARP: {0}")]
    NotIpv4(#[from] crate::ip::NotIpv4),
}

/// Sends `count` announcements for `vip`, `interval` apart. ARP is IPv4's:
/// an IPv6 `vip` is [`GarpError::NotIpv4`].
pub async fn announce(
    ifindex: u32,
    mac: [u8; 6],
    vip: IpAddr,
    count: u32,
    interval: Duration,
) -> Result<(), GarpError> {
    let vip = crate::ip::ipv4(vip)?;
    let error = |source| GarpError::Send {
        vip,
        ifindex,
        source,
    };
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .map_err(error)?;
    let frame = announcement(mac, vip);
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = ETH_P_ARP.to_be();
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: sockaddr_ll is a valid sockaddr of its own length.
    let address = unsafe {
        LinkAddr::from_raw(
            &ll as *const libc::sockaddr_ll as *const libc::sockaddr,
            Some(std::mem::size_of::<libc::sockaddr_ll>() as u32),
        )
    }
    .expect("a well-formed sockaddr_ll");
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        sendto(fd.as_raw_fd(), &frame, &address, MsgFlags::empty()).map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_is_an_rfc5227_arp_announcement() {
        // Broadcast, EtherType ARP; Ethernet/IPv4, request; sender = target = the VIP,
        // target MAC zero. Written out field by field from RFC 826/5227.
        let captured: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x0c, 0x29, 0xaa, 0xbb, 0xcc, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x00, 0x0c, 0x29, 0xaa, 0xbb, 0xcc,
            0xc0, 0xa8, 0xcd, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xa8, 0xcd, 0xfe,
        ];
        assert_eq!(
            announcement(
                [0x00, 0x0c, 0x29, 0xaa, 0xbb, 0xcc],
                Ipv4Addr::new(192, 168, 205, 254)
            ),
            captured
        );
    }

    #[test]
    fn an_ipv6_address_is_a_typed_error_before_any_socket() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let result = runtime.block_on(announce(1, [0; 6], IpAddr::V6(v6), 1, Duration::ZERO));
        assert!(
            matches!(result, Err(GarpError::NotIpv4(crate::ip::NotIpv4(a))) if a == v6),
            "{result:?}"
        );
    }
}
