//! Backend selection for a new flow: the VIP's active Maglev table.

use ha_common::{FlowKey, NO_BACKEND, VipInfo, hash::flow_hash};

use crate::{
    maps::{BACKENDS, MAGLEV},
    ports::Selected,
};

/// The backend for a new flow, or `None` if the table is empty there.
#[inline(always)]
pub fn select(vip: &VipInfo, key: &FlowKey) -> Option<Selected> {
    let hash = flow_hash(key);
    // checked_rem: an empty table is None, and there is no panic path for the verifier to reject.
    let slot = vip.table_offset + hash.checked_rem(vip.table_size)?;
    let backend_id = *MAGLEV.get(slot)?;
    if backend_id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(backend_id)?;
    if backend.addr == 0 {
        return None;
    }
    Some(Selected {
        id: backend_id,
        info: backend,
        hash,
    })
}
