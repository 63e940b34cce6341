//! The VRRP advertisement, versions 2 (RFC 3768) and 3 (RFC 9568) for IPv4:
//! encode, decode and checksum, as pure functions.
//!
//! ```text
//!  v3:  | 3 | 1 | VRID | Priority | Count |  rsvd(4) Max Adver Int(12, cs) | Checksum | addresses...
//!  v2:  | 2 | 1 | VRID | Priority | Count | Auth Type | Adver Int (s)      | Checksum | addresses... | 8 bytes auth
//! ```
//!
//! The v3 IPv4 checksum exists in two forms in the field: keepalived sums an
//! IPv4 pseudo-header (source, destination, protocol 112, length) before the
//! message, as RFC 5798 reads for IPv6; RFC 9568 sums the message only. We
//! send the configured form and accept both. v2 sums the message only.

use std::net::Ipv4Addr;

use crate::{config::VrrpVersion, inet};

pub const IPPROTO_VRRP: u8 = 112;
pub const MULTICAST_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
const TYPE_ADVERTISEMENT: u8 = 1;
const V2_AUTH_DATA: usize = 8;

/// How to compute the v3 checksum for IPv4.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    /// keepalived's form: pseudo-header + message.
    #[default]
    PseudoHeader,
    /// RFC 9568's form: the message only.
    Rfc9568,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub version: VrrpVersion,
    pub vrid: u8,
    pub priority: u8,
    /// Advertisement interval in centiseconds (v2 carries whole seconds).
    pub interval_cs: u16,
    pub addresses: Vec<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("shorter than a VRRP header")]
    Short,
    #[error("version {0} (not 2 or 3)")]
    Version(u8),
    #[error("type {0} (not an advertisement)")]
    Type(u8),
    #[error("length does not match the address count")]
    Length,
    #[error("bad checksum")]
    Checksum,
    #[error("v2 authentication type {0} (only 0, none, is supported)")]
    Auth(u8),
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, length: usize) -> u32 {
    inet::pseudo_header_sum(src, dst, IPPROTO_VRRP, length)
}

/// The checksum of `message` (with its checksum field as it is) in the given form.
fn checksum(message: &[u8], pseudo: Option<(Ipv4Addr, Ipv4Addr)>) -> u16 {
    let start = pseudo.map_or(0, |(src, dst)| pseudo_header_sum(src, dst, message.len()));
    inet::finish(inet::sum16(start, message))
}

impl Advert {
    /// The VRRP message (what follows the IPv4 header) sent from `src` to `dst`.
    pub fn encode(&self, src: Ipv4Addr, dst: Ipv4Addr, mode: ChecksumMode) -> Vec<u8> {
        let count = self.addresses.len().min(255);
        let mut message = Vec::with_capacity(8 + 4 * count + V2_AUTH_DATA);
        match self.version {
            VrrpVersion::V3 => {
                message.extend_from_slice(&[
                    0x30 | TYPE_ADVERTISEMENT,
                    self.vrid,
                    self.priority,
                    count as u8,
                ]);
                message.extend_from_slice(&(self.interval_cs & 0x0fff).to_be_bytes());
            }
            VrrpVersion::V2 => {
                let seconds = (self.interval_cs / 100).clamp(1, 255) as u8;
                message.extend_from_slice(&[
                    0x20 | TYPE_ADVERTISEMENT,
                    self.vrid,
                    self.priority,
                    count as u8,
                    0,
                    seconds,
                ]);
            }
        }
        message.extend_from_slice(&[0, 0]);
        for address in &self.addresses[..count] {
            message.extend_from_slice(&address.octets());
        }
        if self.version == VrrpVersion::V2 {
            message.extend_from_slice(&[0; V2_AUTH_DATA]);
        }
        let pseudo = (self.version == VrrpVersion::V3 && mode == ChecksumMode::PseudoHeader)
            .then_some((src, dst));
        let sum = checksum(&message, pseudo);
        message[6..8].copy_from_slice(&sum.to_be_bytes());
        message
    }

    /// Parses a VRRP message received from `src` to `dst`. A v3 checksum
    /// is accepted in either form; the one that matched is returned.
    pub fn decode(
        message: &[u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<(Advert, ChecksumMode), DecodeError> {
        if message.len() < 8 {
            return Err(DecodeError::Short);
        }
        let version = match message[0] >> 4 {
            2 => VrrpVersion::V2,
            3 => VrrpVersion::V3,
            other => return Err(DecodeError::Version(other)),
        };
        if message[0] & 0x0f != TYPE_ADVERTISEMENT {
            return Err(DecodeError::Type(message[0] & 0x0f));
        }
        let count = message[3] as usize;
        let trailer = if version == VrrpVersion::V2 {
            V2_AUTH_DATA
        } else {
            0
        };
        if message.len() < 8 + 4 * count + trailer {
            return Err(DecodeError::Length);
        }
        let message = &message[..8 + 4 * count + trailer];
        let mode = match version {
            VrrpVersion::V2 => {
                if message[4] != 0 {
                    return Err(DecodeError::Auth(message[4]));
                }
                (checksum(message, None) == 0).then_some(ChecksumMode::Rfc9568)
            }
            VrrpVersion::V3 => {
                if checksum(message, Some((src, dst))) == 0 {
                    Some(ChecksumMode::PseudoHeader)
                } else if checksum(message, None) == 0 {
                    Some(ChecksumMode::Rfc9568)
                } else {
                    None
                }
            }
        }
        .ok_or(DecodeError::Checksum)?;
        let interval_cs = match version {
            VrrpVersion::V3 => u16::from_be_bytes([message[4], message[5]]) & 0x0fff,
            VrrpVersion::V2 => message[5] as u16 * 100,
        };
        let addresses = message[8..8 + 4 * count]
            .chunks_exact(4)
            .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            .collect();
        Ok((
            Advert {
                version,
                vrid: message[1],
                priority: message[2],
                interval_cs,
                addresses,
            },
            mode,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 3);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 9, 200);

    fn advert(version: VrrpVersion) -> Advert {
        Advert {
            version,
            vrid: 51,
            priority: 100,
            interval_cs: 100,
            addresses: vec![VIP],
        }
    }

    // Byte captures of keepalived 2.2.7 adverts (tcpdump -xx, the VRRP
    // message after the IPv4 header), from 10.201.9.3 with `virtual_router_id
    // 51`, `priority 150`, virtual address 10.201.9.200: unicast to
    // 10.201.9.2, v3 with `advert_int 0.1` and v2 with `advert_int 1`.
    // Captured on 2026-11-23 in a namespace pair; tests/tests/vrrp_lab.rs
    // runs keepalived live against the agent.
    const KEEPALIVED_V3: &[u8] = &CAPTURED_V3;
    const KEEPALIVED_V2: &[u8] = &CAPTURED_V2;
    const CAPTURED_V3: [u8; 12] = [
        0x31, 0x33, 0x96, 0x01, 0x00, 0x0a, 0xfc, 0x1c, 0x0a, 0xc9, 0x09, 0xc8,
    ];
    const CAPTURED_V2: [u8; 20] = [
        0x21, 0x33, 0x96, 0x01, 0x00, 0x01, 0x34, 0x39, 0x0a, 0xc9, 0x09, 0xc8, 0, 0, 0, 0, 0, 0,
        0, 0,
    ];

    #[test]
    fn decodes_keepalived_v3_and_v2_captures() {
        let (v3, mode) = Advert::decode(KEEPALIVED_V3, PEER, SRC).expect("keepalived v3 advert");
        assert_eq!(
            mode,
            ChecksumMode::PseudoHeader,
            "keepalived sums the IPv4 pseudo-header"
        );
        assert_eq!(
            v3,
            Advert {
                version: VrrpVersion::V3,
                vrid: 51,
                priority: 150,
                interval_cs: 10,
                addresses: vec![VIP]
            }
        );
        let (v2, _) = Advert::decode(KEEPALIVED_V2, PEER, SRC).expect("keepalived v2 advert");
        assert_eq!(
            v2,
            Advert {
                version: VrrpVersion::V2,
                vrid: 51,
                priority: 150,
                interval_cs: 100,
                addresses: vec![VIP]
            }
        );
    }

    #[test]
    fn our_encoding_of_keepalived_adverts_is_byte_identical() {
        let v3 = Advert {
            version: VrrpVersion::V3,
            vrid: 51,
            priority: 150,
            interval_cs: 10,
            addresses: vec![VIP],
        };
        assert_eq!(
            v3.encode(PEER, SRC, ChecksumMode::PseudoHeader),
            KEEPALIVED_V3
        );
        let v2 = Advert {
            version: VrrpVersion::V2,
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addresses: vec![VIP],
        };
        assert_eq!(
            v2.encode(PEER, SRC, ChecksumMode::PseudoHeader),
            KEEPALIVED_V2
        );
    }

    #[test]
    fn both_v3_checksum_forms_round_trip_and_are_told_apart() {
        for mode in [ChecksumMode::PseudoHeader, ChecksumMode::Rfc9568] {
            let bytes = advert(VrrpVersion::V3).encode(SRC, MULTICAST_GROUP, mode);
            assert_eq!(bytes.len(), 12);
            assert_eq!(bytes[0], 0x31);
            let (decoded, found) = Advert::decode(&bytes, SRC, MULTICAST_GROUP).unwrap();
            assert_eq!((decoded, found), (advert(VrrpVersion::V3), mode));
        }
        // The pseudo-header form depends on the addresses: from another source it is wrong.
        let bytes =
            advert(VrrpVersion::V3).encode(SRC, MULTICAST_GROUP, ChecksumMode::PseudoHeader);
        assert_eq!(
            Advert::decode(&bytes, PEER, MULTICAST_GROUP),
            Err(DecodeError::Checksum)
        );
    }

    #[test]
    fn v2_carries_seconds_and_eight_bytes_of_empty_authentication() {
        let bytes =
            advert(VrrpVersion::V2).encode(SRC, MULTICAST_GROUP, ChecksumMode::PseudoHeader);
        assert_eq!(bytes.len(), 8 + 4 + 8);
        assert_eq!(&bytes[..6], &[0x21, 51, 100, 1, 0, 1]);
        assert_eq!(
            Advert::decode(&bytes, SRC, MULTICAST_GROUP).unwrap().0,
            advert(VrrpVersion::V2)
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = advert(VrrpVersion::V3).encode(SRC, MULTICAST_GROUP, ChecksumMode::Rfc9568);
        assert_eq!(
            Advert::decode(&good[..7], SRC, MULTICAST_GROUP),
            Err(DecodeError::Short)
        );
        assert_eq!(
            Advert::decode(&good[..10], SRC, MULTICAST_GROUP),
            Err(DecodeError::Length)
        );
        let mut bad = good.clone();
        bad[2] ^= 1;
        assert_eq!(
            Advert::decode(&bad, SRC, MULTICAST_GROUP),
            Err(DecodeError::Checksum)
        );
        let mut bad = good.clone();
        bad[0] = 0x41;
        assert_eq!(
            Advert::decode(&bad, SRC, MULTICAST_GROUP),
            Err(DecodeError::Version(4))
        );
        let mut bad = good;
        bad[0] = 0x32;
        assert_eq!(
            Advert::decode(&bad, SRC, MULTICAST_GROUP),
            Err(DecodeError::Type(2))
        );
    }
}
