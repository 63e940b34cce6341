//! Backend selection for a new flow: the VIP's active Maglev table, and
//! passive health's detour around a suspect backend (docs/data-path.md,
//! "Passive health").

use ha_common::{
    Event, FlowKey, NO_BACKEND, SUSPECT_REHASHES, VipInfo,
    hash::{flow_hash, rehash},
};

use crate::{
    maps::{BACKENDS, MAGLEV, count_event},
    passive::is_suspect,
    ports::Selected,
};

/// The backend for a new flow, or `None` if the table is empty there. The
/// slot's backend unless it is suspect; then the first backend of up to
/// [`SUSPECT_REHASHES`] rehashed slots that is another, live and not
/// suspect; else the slot's backend all the same (fail open). A backend
/// that is not suspect keeps all of its slots' flows. `count`: count the
/// detour (`suspect_skipped`, `suspect_fail_open`); not when redispatch only
/// asks where a flow would go.
#[inline(always)]
pub fn select(vip: &VipInfo, key: &FlowKey, now: u64, count: bool) -> Option<Selected> {
    select_hash(vip, flow_hash(key), now, count)
}

/// [`select`] for a hash computed elsewhere: the socket-level balancer's
/// per-socket hash, so a host's own connections skip suspects too.
#[inline(always)]
pub fn select_hash(vip: &VipInfo, hash: u32, now: u64, count: bool) -> Option<Selected> {
    let primary = slot_backend(vip, hash)?;
    let backend = *BACKENDS.get(primary)?;
    if backend.addr == 0 {
        return None;
    }
    let mut selected = Selected {
        id: primary,
        info: backend,
        hash,
    };
    if !is_suspect(primary, now) {
        return Some(selected);
    }
    let other = steer(vip, hash, primary, now);
    match BACKENDS.get(other) {
        Some(info) if other != NO_BACKEND => {
            selected.id = other;
            selected.info = *info;
            if count {
                count_event(Event::SuspectSkipped);
            }
        }
        _ => {
            if count {
                count_event(Event::SuspectFailOpen);
            }
        }
    }
    Some(selected)
}

/// The backend id in the active table's slot for `hash`, or `None` (an
/// empty table, or an empty slot).
#[inline(always)]
fn slot_backend(vip: &VipInfo, hash: u32) -> Option<u32> {
    // checked_rem: an empty table is None, and there is no panic path for the verifier to reject.
    let slot = vip.table_offset + hash.checked_rem(vip.table_size)?;
    let id = *MAGLEV.get(slot)?;
    (id != NO_BACKEND).then_some(id)
}

/// The first backend of the rehashed slots of `hash` that is not `primary`,
/// has a record with an address and is not suspect; [`NO_BACKEND`] if none.
/// A BPF subprogram: its loop is verified once.
#[inline(never)]
fn steer(vip: &VipInfo, hash: u32, primary: u32, now: u64) -> u32 {
    for attempt in 1..=SUSPECT_REHASHES {
        let Some(id) = slot_backend(vip, rehash(hash, attempt)) else {
            continue;
        };
        if id == primary || is_suspect(id, now) {
            continue;
        }
        if BACKENDS.get(id).is_some_and(|b| b.addr != 0) {
            return id;
        }
    }
    NO_BACKEND
}
