//! haproxy.cfg: its parser, the directives that shape a check, and its
//! translation into the config's VIPs.

mod directives;
mod parse;
mod translate;

pub use self::parse::{Line, ParseError, Section, duration, parse};
pub(crate) use self::translate::{note_unconsumed, translate};
