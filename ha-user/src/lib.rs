//! The ha-lb agent as a library: the CLI in `main.rs` is a thin edge over it,
//! and integration tests drive the same code.

pub mod admin;
pub mod agent;
pub mod batch;
pub mod blackhole;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod ebpf_object;
pub mod fault;
pub mod garp;
pub mod handover;
pub mod health;
pub mod import;
pub mod inet;
pub mod ip;
pub mod maglev;
pub mod netlink;
pub mod probe;
pub mod status;
pub mod system;
pub mod telemetry;
pub mod vrrp;
