//! Socket-level balancing for host-originated traffic (docs/data-path.md,
//! "Socket-level balancing"): cgroup programs attached to the root cgroup
//! v2, so a process on this host that connects to a VIP is connected to a
//! backend directly. XDP never sees such a connection: it sees only the
//! packets the host receives.
//!
//! - `cgroup/connect4` (TCP, connected UDP) and `cgroup/sendmsg4`
//!   (unconnected UDP) replace the VIP's address and port by a backend's,
//!   picked from the VIP's active Maglev table by the XDP path's own
//!   selection (`select.rs`): a drained or down backend is not in it, and a
//!   suspect one (passive health) is stepped around, so neither gets a new
//!   socket. No
//!   NAT, no connection table: the socket itself is the backend's.
//! - `cgroup/getpeername4` and `cgroup/recvmsg4` report the VIP instead of
//!   the backend to the socket's owner (SOCK_LB_REVERSE, written by the two
//!   above).
//!
//! Only sockets of the agent's network namespace are balanced: the cgroup
//! hook runs for every process on the host, whatever its namespace, and a
//! socket in a pod's namespace routes through that pod's network, not the
//! host's (several agents in lab namespaces on one kernel each act for
//! their own). A call the program leaves alone is left exactly as it was.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use ha_common::{
    SOCK_LB_REVERSE_ENTRIES, SockBackendKey, SockLbEvent, SockVip, VIP_FLAG_ENABLED, VipKey,
    hash::socket_hash,
};

use crate::{
    maps::{SETTINGS, SETTINGS_ACTIVE, VIPS},
    select::select_hash,
};

/// The network namespace whose sockets are balanced: its cookie
/// (`SO_NETNS_COOKIE`), written by the agent before it attaches. 0 (never
/// written) balances nothing.
#[map(name = "SOCK_LB_NETNS")]
pub static SOCK_LB_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// (socket cookie, backend) -> the VIP the socket asked for. LRU: an entry
/// outlives its socket (no hook runs at close) until newer ones push it out.
#[map(name = "SOCK_LB_REVERSE")]
pub static SOCK_LB_REVERSE: LruHashMap<SockBackendKey, SockVip> =
    LruHashMap::with_max_entries(SOCK_LB_REVERSE_ENTRIES, 0);

/// Per CPU, one counter per [`SockLbEvent`].
#[map(name = "SOCK_LB_EVENTS")]
pub static SOCK_LB_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SockLbEvent::COUNT, 0);

/// What a cgroup/sock_addr program returns to let the call go on (0 would
/// fail it with EPERM; getpeername4 and recvmsg4 must return 1).
const ALLOW: i32 = 1;

#[inline(always)]
fn count(event: SockLbEvent) {
    if let Some(slot) = SOCK_LB_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *slot += 1 }
    }
}

/// Whether the socket lives in the agent's network namespace.
#[inline(always)]
fn in_our_netns(ctx: &SockAddrContext) -> bool {
    let Some(ours) = SOCK_LB_NETNS.get(0) else {
        return false;
    };
    // SAFETY: a helper the cgroup/sock_addr programs may call (kernel 5.7+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    *ours != 0 && *ours == netns
}

/// Balances a connect() or sendmsg() to a VIP: the call's address becomes
/// a backend's, and the socket's VIP is recorded for the reverse hooks.
#[inline(always)]
fn balance(ctx: &SockAddrContext, balanced: SockLbEvent) -> i32 {
    // SAFETY: the kernel's context; these fields are readable in the hooks
    // this is called from.
    let (addr, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    let key = VipKey {
        addr,
        port: port as u16,
        protocol: protocol as u8,
        _pad: 0,
    };
    // SAFETY: copied out at once; the agent replaces whole values.
    let Some(vip) = (unsafe { VIPS.get(key) }).copied() else {
        return ALLOW;
    };
    if !in_our_netns(ctx) {
        count(SockLbEvent::OtherNetns);
        return ALLOW;
    }
    if vip.flags & VIP_FLAG_ENABLED == 0 {
        count(SockLbEvent::VipDisabled);
        return ALLOW;
    }
    // SAFETY: a helper the cgroup/sock_addr programs may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(backend) = select_hash(&vip, socket_hash(cookie, addr, key.port), now(), false)
        .map(|selected| selected.info)
    else {
        count(SockLbEvent::NoBackend);
        return ALLOW;
    };
    let reverse = SockBackendKey {
        cookie,
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: 0,
    };
    let asked = SockVip {
        addr,
        port: key.port,
        _pad: 0,
    };
    if SOCK_LB_REVERSE.insert(&reverse, &asked, 0).is_err() {
        count(SockLbEvent::ReverseNotRecorded);
    }
    // SAFETY: the kernel's context; connect4 and sendmsg4 may write these.
    unsafe {
        (*ctx.sock_addr).user_ip4 = backend.addr;
        (*ctx.sock_addr).user_port = u32::from(backend.port);
    }
    count(balanced);
    ALLOW
}

/// The data path's clock, as the XDP program reads it (passive health's
/// suspect times are on it).
#[inline(always)]
fn now() -> u64 {
    let slot = SETTINGS_ACTIVE.get(0).map_or(0, |s| *s & 1);
    match SETTINGS.get(slot) {
        Some(settings) => crate::conntrack::now_ns(settings),
        // SAFETY: a helper without arguments.
        None => unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() },
    }
}

/// getpeername() and recvmsg(): a balanced socket's backend is reported as
/// the VIP it asked for.
#[inline(always)]
fn restore(ctx: &SockAddrContext, restored: SockLbEvent) -> i32 {
    if !in_our_netns(ctx) {
        return ALLOW;
    }
    // SAFETY: the kernel's context; readable in getpeername4 and recvmsg4.
    let (addr, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    // SAFETY: a helper the cgroup/sock_addr programs may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockBackendKey {
        cookie,
        backend_addr: addr,
        backend_port: port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    let Some(vip) = (unsafe { SOCK_LB_REVERSE.get(key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: the kernel's context; getpeername4 and recvmsg4 may write these.
    unsafe {
        (*ctx.sock_addr).user_ip4 = vip.addr;
        (*ctx.sock_addr).user_port = u32::from(vip.port);
    }
    count(restored);
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn ha_sock_connect4(ctx: SockAddrContext) -> i32 {
    balance(&ctx, SockLbEvent::ConnectBalanced)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ha_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(&ctx, SockLbEvent::SendmsgBalanced)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ha_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, SockLbEvent::PeerRestored)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ha_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, SockLbEvent::SourceRestored)
}
