//! `ha-user import`: turns a haproxy.cfg and a keepalived.conf into the
//! equivalent ha-lb config.
//!
//! The translation is faithful rather than idiomatic: the same VIPs,
//! backends, weights, check timings and VRRP settings (keepalived's VRRPv2
//! and 1 s adverts stay unless the file said otherwise), so an ha-lb host
//! can join a running keepalived pair during a migration. Every line of
//! either file is either consumed by the translation or listed with the
//! reason it was not carried over; nothing is dropped silently.
//!
//! Hand-written parsers: no maintained crate parses either format (the
//! crates.io haproxy parsers cover a subset and are unmaintained), and both
//! syntaxes are small.
//!
//! Per source, a parser and a translation (`haproxy/`, `keepalived/`); the
//! `ledger` records what each consumed and notes the rest; [`render`]
//! writes the result. This module runs them in order.

pub mod haproxy;
pub mod keepalived;
mod ledger;
mod render;

use std::{collections::BTreeSet, net::Ipv4Addr};

use self::ledger::Ledger;
pub use self::{ledger::Note, render::render};
use crate::config::{Config, GarpConfig};

/// One input file: the name used in notes, and its text.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

pub struct Imported {
    pub config: Config,
    /// keepalived's `interface`: what `ha-user attach --iface` should name.
    pub interface: Option<String>,
    pub notes: Vec<Note>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: {source}")]
    Haproxy {
        file: String,
        #[source]
        source: haproxy::ParseError,
    },
    #[error("{file}: {source}")]
    Keepalived {
        file: String,
        #[source]
        source: keepalived::ParseError,
    },
    #[error(
        "{at}: frontend {frontend} binds {bind}, which names no address; give the keepalived.conf \
         whose virtual_ipaddress is the VIP (--keepalived)"
    )]
    NoVipAddress {
        at: String,
        frontend: String,
        bind: String,
    },
    #[error(
        "{0}: no frontend or listen section with an IPv4 bind sends traffic to servers with IPv4 \
         addresses (ha-lb serves IPv4 VIPs and backends only for now; IPv6 binds and servers are \
         not carried over)"
    )]
    NothingToBalance(String),
}

pub fn import(
    haproxy_source: &Source<'_>,
    keepalived_source: Option<&Source<'_>>,
) -> Result<Imported, ImportError> {
    let mut ledger = Ledger::default();
    let keepalived_tree = match keepalived_source {
        Some(source) => {
            Some(
                keepalived::parse(source.text).map_err(|e| ImportError::Keepalived {
                    file: source.name.to_string(),
                    source: e,
                })?,
            )
        }
        None => None,
    };
    let vrrp_part = match (keepalived_source, &keepalived_tree) {
        (Some(source), Some(tree)) => Some(keepalived::translate(source.name, tree, &mut ledger)),
        _ => None,
    };
    let sections = haproxy::parse(haproxy_source.text).map_err(|e| ImportError::Haproxy {
        file: haproxy_source.name.to_string(),
        source: e,
    })?;
    let keepalived_vips: Vec<Ipv4Addr> = vrrp_part
        .iter()
        .flat_map(|p| &p.vip_lines)
        .map(|(address, _)| *address)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let vips = haproxy::translate(
        haproxy_source.name,
        &sections,
        &keepalived_vips,
        &mut ledger,
    )?;
    if vips.is_empty() {
        return Err(ImportError::NothingToBalance(
            haproxy_source.name.to_string(),
        ));
    }
    if let (Some(source), Some(part)) = (keepalived_source, &vrrp_part) {
        for (address, line) in &part.vip_lines {
            if !vips.iter().any(|v| v.address == *address) {
                ledger.note(
                    source.name,
                    *line,
                    address.to_string(),
                    "virtual address that no haproxy frontend serves: not carried over",
                );
            }
        }
    }

    // Whatever the translation did not consume is listed with a reason.
    haproxy::note_unconsumed(haproxy_source.name, &sections, &mut ledger);
    if let (Some(source), Some(tree)) = (keepalived_source, &keepalived_tree) {
        keepalived::note_unconsumed(source.name, tree, &mut ledger);
    }

    let notes = ledger.into_notes();
    let (vrrp, garp, interface) = match vrrp_part {
        Some(part) => (part.vrrp, part.garp, part.interface),
        None => (None, GarpConfig::default(), None),
    };
    Ok(Imported {
        config: Config {
            vips,
            data_plane: Default::default(),
            vrrp,
            garp,
            telemetry: Default::default(),
            socket_lb: Default::default(),
        },
        interface,
        notes,
    })
}

#[cfg(test)]
mod tests;
