//! Agent configs for the lab suites, built as the agent's own typed
//! [`Config`] rather than as YAML text, and written with [`Config::to_yaml`].
//!
//! Every builder starts from the defaults the parser fills in, so a test
//! states only what it is about:
//!
//! ```no_run
//! # let lab = ha_lab::Lab::new(&["lb", "api1", "api2"]).unwrap();
//! use std::time::Duration;
//! use ha_lab::config::{self, VipExt};
//! use ha_user::config::CheckConfig;
//!
//! let (api1, api2) = (lab.host("api1").addr, lab.host("api2").addr);
//! let mut conf = config::agent([config::vip("apiserver", lab.vip(0), 6443)
//!     .backends(&[api1, api2])
//!     .weight(api2, 2)
//!     .check(CheckConfig { timeout: Duration::from_millis(500), ..CheckConfig::default() })]);
//! conf.vrrp = Some(config::vrrp(51));
//! let path = config::write(&lab, "config.yaml", &conf);
//! ```
//!
//! A check's type and a backend's port are left unset (`None`), as a file
//! that does not name them: the agent fills them in from the VIP's port.
//! Tests of the parser itself (malformed or invalid files, the shipped
//! examples) write their YAML as text.
//!
//! Addresses are taken as [`Ipv4Addr`], the lab's, and converted by [`ip`]
//! into whatever type the config's address fields have.

use std::{net::Ipv4Addr, path::PathBuf};

use ha_user::config::{
    BackendConfig, CheckConfig, Config, DataPlaneConfig, GarpConfig, Mode, Protocol,
    SocketLbConfig, TelemetryConfig, VipConfig, VrrpConfig,
};

use crate::Lab;

/// `address` as the type of a config's address field (`Ipv4Addr` itself,
/// or `IpAddr`): `config.vrrp.unicast_peers = vec![config::ip(peer)]`.
pub fn ip<T: From<Ipv4Addr>>(address: Ipv4Addr) -> T {
    T::from(address)
}

/// A config with these VIPs and every other section at its default
/// (no VRRP: the host owns the VIPs statically).
pub fn agent(vips: impl IntoIterator<Item = VipConfig>) -> Config {
    Config {
        vips: vips.into_iter().collect(),
        data_plane: DataPlaneConfig::default(),
        vrrp: None,
        garp: GarpConfig::default(),
        telemetry: TelemetryConfig::default(),
        socket_lb: SocketLbConfig::default(),
    }
}

/// A TCP VIP in full NAT with the default check and no backends yet.
pub fn vip(name: &str, address: Ipv4Addr, port: u16) -> VipConfig {
    VipConfig {
        name: name.to_string(),
        address: ip(address),
        port,
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        check: CheckConfig::default(),
        on_marked_down: Default::default(),
        backends: Vec::new(),
    }
}

/// A backend on the VIP's port, weight 1.
pub fn backend(address: Ipv4Addr) -> BackendConfig {
    BackendConfig {
        address: ip(address),
        port: None,
        weight: 1,
    }
}

/// A VRRP section for `vrid` with the parser's defaults: priority 100,
/// version 3, 100 ms adverts, preemption without delay, a 10 s restart
/// hold, multicast, on the attach interface.
pub fn vrrp(vrid: u8) -> VrrpConfig {
    VrrpConfig::new(vrid)
}

/// The addresses of the lab hosts `names`, in order.
pub fn addresses(lab: &Lab, names: &[&str]) -> Vec<Ipv4Addr> {
    names.iter().map(|name| lab.host(name).addr).collect()
}

/// Writes `config` as YAML into the lab's log directory under `name`: its path.
pub fn write(lab: &Lab, name: &str, config: &Config) -> PathBuf {
    let path = lab.log_dir().join(name);
    std::fs::write(&path, config.to_yaml())
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Chained changes to a [`VipConfig`].
pub trait VipExt: Sized {
    /// Adds a backend at each address, on the VIP's port, weight 1.
    fn backends(self, addresses: &[Ipv4Addr]) -> Self;
    /// Gives the backend at `address` this weight.
    fn weight(self, address: Ipv4Addr, weight: u32) -> Self;
    /// Replaces the health check.
    fn check(self, check: CheckConfig) -> Self;
    fn protocol(self, protocol: Protocol) -> Self;
}

impl VipExt for VipConfig {
    fn backends(mut self, addresses: &[Ipv4Addr]) -> Self {
        self.backends
            .extend(addresses.iter().map(|&address| backend(address)));
        self
    }

    fn weight(mut self, address: Ipv4Addr, weight: u32) -> Self {
        // Compared through a backend built from it: whatever the field's type.
        let wanted = backend(address).address;
        let found = self
            .backends
            .iter_mut()
            .find(|b| b.address == wanted)
            .unwrap_or_else(|| panic!("no backend {address} in VIP {}", self.name));
        found.weight = weight;
        self
    }

    fn check(mut self, check: CheckConfig) -> Self {
        self.check = check;
        self
    }

    fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(yaml: &str) -> Config {
        Config::parse(yaml, "test").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    /// The builders' defaults are the parser's: a built config reads back
    /// as the file that names only what the builder was told.
    #[test]
    fn a_built_config_reads_back_as_the_minimal_file() {
        let (vip_address, a, b) = (
            Ipv4Addr::new(10, 0, 0, 100),
            Ipv4Addr::new(10, 0, 0, 11),
            Ipv4Addr::new(10, 0, 0, 12),
        );
        let mut built = agent([vip("apiserver", vip_address, 6443)
            .backends(&[a, b])
            .weight(b, 2)]);
        built.vrrp = Some(vrrp(51));
        assert_eq!(
            parsed(&built.to_yaml()),
            parsed(
                "vips:\n  - name: apiserver\n    address: 10.0.0.100\n    port: 6443\n    backends:\n      - address: 10.0.0.11\n      - address: 10.0.0.12\n        weight: 2\nvrrp:\n  vrid: 51\n"
            )
        );
        let udp = agent([vip("dns", vip_address, 5353)
            .protocol(Protocol::Udp)
            .backends(&[a])]);
        assert_eq!(
            parsed(&udp.to_yaml()),
            parsed(
                "vips: [{name: dns, address: 10.0.0.100, port: 5353, protocol: udp, backends: [{address: 10.0.0.11}]}]\n"
            )
        );
    }
}
