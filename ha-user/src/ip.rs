//! Addresses travel through the agent as [`IpAddr`]; the places that still
//! need IPv4 (the data plane's map formats, netlink's /32 VIP addresses and
//! IPv4 neighbours, the VRRP socket, gratuitous ARP, the pinned handover
//! record) convert with [`ipv4`] at their edge. Validation refuses IPv6
//! first (`config::validate`), so the error is unreachable from a valid
//! config; it is a typed error all the same, never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv6 address reached a part of ha-lb that serves IPv4 only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} is IPv6; ha-lb serves IPv4 only for now")]
pub struct NotIpv4(pub Ipv6Addr);

/// `address` as IPv4 (an IPv4-mapped IPv6 address is still IPv6 here:
/// nothing in ha-lb writes one, and validation refuses it).
pub fn ipv4(address: IpAddr) -> Result<Ipv4Addr, NotIpv4> {
    match address {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => Err(NotIpv4(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_passes_and_ipv6_is_a_typed_error() {
        assert_eq!(
            ipv4(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            Ok(Ipv4Addr::new(10, 0, 0, 1))
        );
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let error = ipv4(IpAddr::V6(v6)).unwrap_err();
        assert_eq!(error, NotIpv4(v6));
        assert_eq!(
            error.to_string(),
            "2001:db8::1 is IPv6; ha-lb serves IPv4 only for now"
        );
    }
}
