//! **The tc egress program** (docs/data-path.md, "Local backends", "The tc egress program"): a
//! packet leaving the attached interface is a local backend's reply when its tuple is the
//! reverse key of a translated local flow; its source becomes the flow's VIP and port. Nothing
//! is ever dropped: every packet leaves, translated or untouched, counted in one slot of
//! `EGRESS_VERDICTS`.
//!
//! The checksums are updated as the kernel's helpers do (`bpf_l3_csum_replace`,
//! `bpf_l4_csum_replace`) on an skb without checksum offload (`CHECKSUM_NONE`, as
//! `BPF_PROG_TEST_RUN` builds it): `csum_replace4` in 32-bit one's complement arithmetic, the
//! address (4 bytes, part of the pseudo-header) first, then the port (2 bytes); UDP with
//! `BPF_F_MARK_MANGLED_0` (a zero checksum is left alone, a zero result written `0xffff`,
//! checked after each of the two calls). The values are the raw wire bytes read as native
//! integers, as the kernel reads them. (With `CHECKSUM_PARTIAL`, which this model does not
//! describe, the kernel updates only the pseudo-header part.)

use ha_common::{EgressVerdict, Event, FLOW_LOCAL, FLOW_RESET, NatKey, PROTO_TCP, PROTO_UDP};

use crate::flow::{backend_bits, has_reverse, names, refresh};
use crate::{Ctx, Model};

/// The result of one packet through the egress program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressOutcome {
    /// The one `EGRESS_VERDICTS` slot it counted in.
    pub verdict: EgressVerdict,
    /// The packet as it leaves (untouched unless `Translated`).
    pub output: Vec<u8>,
    /// The program's return value: `TC_ACT_OK` (0), or `TC_ACT_SHOT` (2)
    /// for a redispatched RST.
    pub action: i32,
}

/// `TC_ACT_OK` (include/uapi/linux/pkt_cls.h): the packet goes on.
pub const TC_ACT_OK: i32 = 0;
/// `TC_ACT_SHOT` (include/uapi/linux/pkt_cls.h): the packet is dropped.
pub const TC_ACT_SHOT: i32 = 2;

/// A parsed reply: header offsets, its reverse key (source = backend, destination = client),
/// its TCP flags (0 for UDP).
struct Reply {
    l3: usize,
    l4: usize,
    key: NatKey,
    tcp_flags: u8,
}

fn be16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn ne32(frame: &[u8], at: usize) -> Option<u32> {
    let b = frame.get(at..at + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn ne16(frame: &[u8], at: usize) -> Option<u16> {
    let b = frame.get(at..at + 2)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

/// "The tc egress program", steps 1 to 5: the frame's headers, or the verdict to leave it with.
fn parse(frame: &[u8]) -> Result<Reply, EgressVerdict> {
    let malformed = EgressVerdict::PassMalformed;
    let len = frame.len();
    let mut ethertype = be16(frame, 12).ok_or(malformed)?;
    let mut l3 = 14;
    if ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(frame, 16).ok_or(malformed)?;
        l3 = 18;
    }
    if ethertype != 0x0800 {
        return Err(EgressVerdict::Pass);
    }
    let version_ihl = *frame.get(l3).ok_or(malformed)?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let tot_len = usize::from(be16(frame, l3 + 2).ok_or(malformed)?);
    if version_ihl >> 4 != 4 || ihl < 20 || tot_len < ihl || l3 + tot_len > len {
        return Err(malformed);
    }
    if be16(frame, l3 + 6).ok_or(malformed)? & 0x3fff != 0 {
        return Err(EgressVerdict::PassFragment);
    }
    let protocol = *frame.get(l3 + 9).ok_or(malformed)?;
    let needed = match protocol {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return Err(EgressVerdict::Pass),
    };
    if ihl + needed > tot_len {
        return Err(malformed);
    }
    let l4 = l3 + ihl;
    let tcp_flags = if protocol == PROTO_TCP {
        *frame.get(l4 + 13).ok_or(malformed)?
    } else {
        0
    };
    Ok(Reply {
        l3,
        l4,
        key: NatKey {
            backend_addr: ne32(frame, l3 + 12).ok_or(malformed)?,
            lb_addr: ne32(frame, l3 + 16).ok_or(malformed)?,
            backend_port: ne16(frame, l4).ok_or(malformed)?,
            nat_port: ne16(frame, l4 + 2).ok_or(malformed)?,
            protocol,
            _pad: [0; 3],
        },
        tcp_flags,
    })
}

/// The kernel's `csum_add`: 32-bit addition with the carry added back.
fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

/// The kernel's `csum_fold`: 32 bits folded to 16, complemented.
fn csum_fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The kernel's `csum_replace4` on a checksum field read as a native `u16`.
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    csum_fold(csum_add(csum_add(!u32::from(check), !from), to))
}

/// `bpf_l4_csum_replace` of a UDP checksum with `BPF_F_MARK_MANGLED_0`.
fn udp_replace(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match csum_replace4(check, from, to) {
        0 => 0xffff,
        c => c,
    }
}

impl Model {
    /// One packet through the tc egress program. `kernel_now_ns` is the kernel clock, used
    /// only when `config.settings.clock_ns == 0`.
    pub fn egress(&mut self, frame: &[u8], kernel_now_ns: u64) -> EgressOutcome {
        let now = self.now(kernel_now_ns);
        let mut output = frame.to_vec();
        let mut ctx = Ctx::new(&self.config, &mut self.state, self.capacity, now);
        let verdict = ctx.egress(&mut output);
        if verdict != EgressVerdict::Translated {
            output.clear();
            output.extend_from_slice(frame);
        }
        if let Some(slot) = self.state.egress_verdicts.get_mut(verdict as usize) {
            slot.packets = slot.packets.wrapping_add(1);
            slot.bytes = slot.bytes.wrapping_add(frame.len() as u64);
        }
        let action = if verdict == EgressVerdict::Redispatched {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        EgressOutcome {
            verdict,
            output,
            action,
        }
    }
}

impl Ctx<'_> {
    /// The egress pipeline on `frame` (rewritten in place when translated).
    fn egress(&mut self, frame: &mut [u8]) -> EgressVerdict {
        let reply = match parse(frame) {
            Ok(reply) => reply,
            Err(verdict) => return verdict,
        };
        let key = reply.key;
        // 6. A reverse entry for the tuple, whose flow is a translated local flow naming it.
        let Some(entry) = self.state.reverse.get(&key).copied() else {
            return EgressVerdict::Pass;
        };
        let client = entry.flow;
        let Some(flow) = self.flow(&client) else {
            return EgressVerdict::PassNoFlow;
        };
        if flow.flags & FLOW_LOCAL == 0
            || !has_reverse(&client, &flow)
            || !names(&flow, key.lb_addr, key.nat_port, entry.backend_id)
        {
            return EgressVerdict::PassNoFlow;
        }
        // 7. Expired: forgotten.
        if self.expired(&client, &flow) {
            self.forget(&client, &flow);
            self.count_event(Event::ExpiredFlowReplaced);
            return EgressVerdict::PassNoFlow;
        }
        // Passive health, as on the reply path: a local backend refusing a SYN.
        if crate::passive::refuses_syn(reply.tcp_flags, flow.flags) {
            self.suspect(entry.backend_id, ha_common::PASSIVE_REASON_RST_TO_SYN);
            if self.redispatch(&client, entry.backend_id) {
                self.forget(&client, &flow);
                return EgressVerdict::Redispatched;
            }
        }
        // 8. The backend packet rule, then the source rewritten.
        let now = self.now;
        if let Some(flow) = self.state.conntrack.get_mut(&client) {
            let was_reset = flow.flags & FLOW_RESET != 0;
            refresh(flow, backend_bits(reply.tcp_flags), now);
            if flow.flags & FLOW_RESET != 0 && !was_reset {
                self.count_event(Event::FlowReset);
            }
        }
        rewrite_source(frame, &reply, client.dst_addr, client.dst_port);
        EgressVerdict::Translated
    }
}

fn rewrite_source(frame: &mut [u8], reply: &Reply, addr: u32, port: u16) {
    let (l3, l4, key) = (reply.l3, reply.l4, &reply.key);
    let write = |frame: &mut [u8], at: usize, bytes: &[u8]| {
        if let Some(dst) = frame.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    if let Some(check) = ne16(frame, l3 + 10) {
        let check = csum_replace4(check, key.backend_addr, addr);
        write(frame, l3 + 10, &check.to_ne_bytes());
    }
    let udp = key.protocol == PROTO_UDP;
    let at = if udp { l4 + 6 } else { l4 + 16 };
    if let Some(check) = ne16(frame, at) {
        let (old_port, new_port) = (u32::from(key.backend_port), u32::from(port));
        let check = if udp {
            let check = udp_replace(check, key.backend_addr, addr);
            udp_replace(check, old_port, new_port)
        } else {
            let check = csum_replace4(check, key.backend_addr, addr);
            csum_replace4(check, old_port, new_port)
        };
        write(frame, at, &check.to_ne_bytes());
    }
    write(frame, l3 + 12, &addr.to_ne_bytes());
    write(frame, l4, &port.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's arithmetic agrees with RFC 1624 eqn. 3 (the XDP side's) wherever the
    /// result is not a zero of one's complement.
    #[test]
    fn kernel_replace_matches_rfc1624_away_from_zero() {
        let mut seed = 0x1234_5678_u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..100_000 {
            let (check, from, to) = (next() as u16, next(), next());
            let kernel = csum_replace4(check, from, to);
            let words = |v: u32| [v as u16, (v >> 16) as u16];
            let [f0, f1] = words(from);
            let [t0, t1] = words(to);
            let rfc = crate::nat::csum_update_words(check, &[(f0, t0), (f1, t1)]);
            if kernel != 0 && kernel != 0xffff && rfc != 0 && rfc != 0xffff {
                assert_eq!(kernel, rfc, "{check:#x} {from:#x} {to:#x}");
            }
        }
    }
}
