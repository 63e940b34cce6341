//! VRRP (RFC 9568 version 3, RFC 3768 version 2) for the VIPs: which LB host
//! owns them. The codec and the state machine are pure; `socket` and
//! `announcer` put them on the wire.

pub mod announcer;
pub mod echo;
pub mod machine;
pub mod packet;
pub mod socket;
