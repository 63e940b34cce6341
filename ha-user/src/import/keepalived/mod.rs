//! keepalived.conf: its parser, and its translation into the config's
//! `vrrp` and `garp` sections.

mod parse;
mod translate;

pub use self::parse::{ParseError, Statement, parse};
pub(crate) use self::translate::{note_unconsumed, translate};
