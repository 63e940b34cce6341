//! **Passive health** (docs/data-path.md, "Passive health"): the suspect flag a refusal sets,
//! the event it emits, selection's detour around a suspect backend, and L4 redispatch.
//!
//! Written from the spec, not from the program: a backend is suspect while `SUSPECT[id]` is
//! set and `now < SUSPECT[id] + SUSPECT_TTL_NS` (an entry from the future holds); a refusal
//! writes `SUSPECT[id] = now` and, when the backend was not suspect, counts
//! `backend_suspected` and appends a `PassiveEvent` to the ring (modelled unbounded: the fuzzer
//! never fills 64 KiB). REDISPATCHED is an LRU map of 16384 keys, modelled without eviction
//! (a fuzz case never holds that many).

use ha_common::hash::rehash;
use ha_common::{
    BackendInfo, Event, FLOW_ASSURED, FLOW_RESET, FLOW_SEEN_REPLY, FlowKey, PassiveEvent,
    REDISPATCH_WINDOW_NS, SUSPECT_REHASHES, SUSPECT_TTL_NS, VIP_FLAG_ENABLED, VipInfo, VipKey,
};

use crate::Ctx;

/// A flow is new while its backend sent nothing but RSTs, it is not confirmed and not reset.
pub fn is_new(flags: u32) -> bool {
    flags & (FLOW_SEEN_REPLY | FLOW_ASSURED | FLOW_RESET) == 0
}

/// A backend's TCP flags refuse its new flow's SYN: RST and ACK both set, the flow new.
pub fn refuses_syn(tcp_flags: u8, flow_flags: u32) -> bool {
    let rst_ack = ha_common::TCP_RST | ha_common::TCP_ACK;
    tcp_flags & rst_ack == rst_ack && is_new(flow_flags)
}

impl Ctx<'_> {
    /// Whether backend `id` is suspect now (`SUSPECT` has `MAX_BACKENDS` entries: an id
    /// outside it never is).
    pub fn is_suspect(&self, id: u32) -> bool {
        match self.state.suspect.get(&id) {
            Some(&at) if at != 0 => self.now < at.saturating_add(SUSPECT_TTL_NS),
            _ => false,
        }
    }

    /// A refusal by backend `id` (`reason`: `PASSIVE_REASON_*`).
    pub fn suspect(&mut self, id: u32, reason: u32) {
        if id >= ha_common::MAX_BACKENDS {
            return;
        }
        let was = self.is_suspect(id);
        self.state.suspect.insert(id, self.now);
        if was {
            return;
        }
        self.count_event(Event::BackendSuspected);
        self.state.passive_events.push(PassiveEvent {
            backend_id: id,
            reason,
            at_ns: self.now,
        });
    }

    /// Step 5's selection: the Maglev slot's backend for `hash`, unless it is suspect; then the
    /// first of the rehashed slots (attempts 1 to `SUSPECT_REHASHES`) whose backend is another
    /// one, present and not suspect; else the slot's own (fail open). `count`: count
    /// `suspect_skipped` / `suspect_fail_open`.
    pub fn select_backend(
        &mut self,
        vip: &VipInfo,
        hash: u32,
        count: bool,
    ) -> Option<(u32, BackendInfo)> {
        let (primary, backend) = self.maglev_pick(vip, hash)?;
        if !self.is_suspect(primary) {
            return Some((primary, backend));
        }
        let other = (1..=SUSPECT_REHASHES)
            .filter_map(|attempt| self.maglev_pick(vip, rehash(hash, attempt)))
            .find(|&(id, _)| id != primary && !self.is_suspect(id));
        if count {
            self.count_event(match other {
                Some(_) => Event::SuspectSkipped,
                None => Event::SuspectFailOpen,
            });
        }
        Some(other.unwrap_or((primary, backend)))
    }

    /// L4 redispatch of flow `key`, whose SYN `backend_id` refused (already suspected): not
    /// within `REDISPATCH_WINDOW_NS` of the key's last redispatch (`redispatch_limit`), and only
    /// if selection now gives the key another backend that is not suspect
    /// (`redispatch_no_alternative`); then the key is recorded (`redispatched`).
    pub fn redispatch(&mut self, key: &FlowKey, backend_id: u32) -> bool {
        if let Some(&at) = self.state.redispatched.get(key)
            && self.now < at.saturating_add(REDISPATCH_WINDOW_NS)
        {
            self.count_event(Event::RedispatchLimit);
            return false;
        }
        let vip_key = VipKey {
            addr: key.dst_addr,
            port: key.dst_port,
            protocol: key.protocol,
            _pad: 0,
        };
        let next = match self.config.vips.get(&vip_key).copied() {
            Some(vip) if vip.flags & VIP_FLAG_ENABLED != 0 => {
                self.select_backend(&vip, ha_common::hash::flow_hash(key), false)
            }
            _ => None,
        };
        let eligible = next.is_some_and(|(id, _)| id != backend_id && !self.is_suspect(id));
        if !eligible {
            self.count_event(Event::RedispatchNoAlternative);
            return false;
        }
        self.state.redispatched.insert(*key, self.now);
        self.count_event(Event::Redispatched);
        true
    }
}
