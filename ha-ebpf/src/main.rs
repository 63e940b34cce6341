//! The ha-lb XDP program.
//!
//! The entry point stays thin: it runs the pipeline (parse -> count) and
//! returns a verdict. Later stages (classify, conntrack, select, rewrite,
//! forward) slot in between as their own modules.
#![no_std]
#![no_main]

mod counters;
mod parse;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use ha_common::ProtoIndex;

#[xdp]
pub fn ha_xdp(ctx: XdpContext) -> u32 {
    let class = match parse::parse_frame(&ctx) {
        Ok(frame) => match frame.l3 {
            parse::L3::Ipv4 { protocol } => parse::classify_ipv4_protocol(protocol),
            parse::L3::Other => ProtoIndex::NonIpv4,
        },
        Err(parse::Malformed) => ProtoIndex::Malformed,
    };
    counters::count_protocol(class, ctx.data_end() - ctx.data());
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
