//! Validation without the host: every reason a parsed config cannot be
//! used, each naming its key, from the values alone. Nothing here reads a
//! file or asks the system; what does is in [`super::host`].

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::Duration,
};

use super::{
    CgroupSetting, CheckConfig, CheckKind, Config, GarpConfig, SocketLbConfig, TrackAction, Verify,
    VrrpConfig, VrrpVersion,
};

/// Weights above this are refused: they would only slow the table build.
pub const MAX_WEIGHT: u32 = 1000;
const MAX_TABLE_SIZE: u32 = 1_000_003;

/// Every reason `config` (its defaults applied) cannot be used, each naming
/// its key: the data plane's first, then the VIPs', VRRP's and GARP's.
pub fn problems(config: &Config) -> Vec<String> {
    let mut problems = data_plane_problems(config);
    problems.extend(vip_problems(config));
    if let Some(vrrp) = &config.vrrp {
        problems.extend(vrrp_problems(vrrp));
    }
    problems.extend(garp_problems(&config.garp));
    problems.extend(socket_lb_problems(&config.socket_lb));
    problems.extend(backend_count_problems(config));
    problems
}

/// `data_plane`; the NAT source is also checked against the VIPs.
fn data_plane_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let dp = &config.data_plane;
    let m = dp.maglev_table_size;
    if !is_prime(m) || !(101..=MAX_TABLE_SIZE).contains(&m) {
        problems.push(format!(
            "data_plane.maglev_table_size: {m} must be a prime between 101 and {MAX_TABLE_SIZE} (default 65537)"
        ));
    }
    if dp.max_vips == 0 || dp.max_vips > ha_common::MAX_VIPS {
        problems.push(format!(
            "data_plane.max_vips: {} must be 1..={}",
            dp.max_vips,
            ha_common::MAX_VIPS
        ));
    }
    if dp.conntrack.max_flows < 1024 {
        problems.push(format!(
            "data_plane.conntrack.max_flows: {} is below the minimum of 1024",
            dp.conntrack.max_flows
        ));
    }
    let ct = &dp.conntrack;
    for (key, value) in [
        ("tcp_syn_timeout", ct.tcp_syn_timeout),
        ("tcp_idle_timeout", ct.tcp_idle_timeout),
        ("tcp_closing_timeout", ct.tcp_closing_timeout),
        ("udp_unreplied_timeout", ct.udp_unreplied_timeout),
        ("udp_idle_timeout", ct.udp_idle_timeout),
    ] {
        if value < Duration::from_secs(1) {
            problems.push(format!(
                "data_plane.conntrack.{key}: {} is below 1s",
                humantime::format_duration(value)
            ));
        }
    }
    let range = dp.nat.port_range;
    if range.min > range.max || range.min < 1024 {
        problems.push(format!(
            "data_plane.nat.port_range: {range} must be MIN-MAX with 1024 <= MIN <= MAX"
        ));
    }
    if let Some(source) = dp.nat.source_address {
        problems.extend(address_problem(
            "data_plane.nat.source_address",
            source,
            "ha-lb's NAT source must be IPv4 for now",
        ));
    }
    if let Some(source) = dp.nat.source_address
        && let Some(vip) = config.vips.iter().find(|v| v.address == source)
    {
        problems.push(format!(
            "data_plane.nat.source_address: {source} is the address of VIP {}; the NAT source \
             must be an address of this host that is not a VIP (a VIP moves with VRRP, and \
             its packets are the clients')",
            vip.name
        ));
    }
    problems
}

/// `vips[]`: each VIP, its backends and its check.
fn vip_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let dp = &config.data_plane;
    let m = dp.maglev_table_size;
    if config.vips.is_empty() {
        problems.push("vips: at least one VIP is required".to_string());
    }
    if config.vips.len() > dp.max_vips as usize {
        problems.push(format!(
            "vips: {} VIPs configured but data_plane.max_vips is {}",
            config.vips.len(),
            dp.max_vips
        ));
    }
    let mut names = HashSet::new();
    let mut listeners = HashMap::new();
    for (i, vip) in config.vips.iter().enumerate() {
        let at = format!("vips[{i}] ({})", vip.name);
        if vip.name.is_empty()
            || !vip
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            problems.push(format!(
                "{at}.name: {:?} must be non-empty letters, digits, '-' or '_'",
                vip.name
            ));
        }
        if !names.insert(vip.name.as_str()) {
            problems.push(format!("{at}.name: {:?} is used by another VIP", vip.name));
        }
        problems.extend(address_problem(
            &format!("{at}.address"),
            vip.address,
            "ha-lb serves IPv4 VIPs only for now",
        ));
        if vip.port == 0 {
            problems.push(format!("{at}.port: must be 1-65535"));
        }
        if let Some(other) = listeners.insert((vip.address, vip.port, vip.protocol), &vip.name) {
            problems.push(format!(
                "{at}: {}:{}/{} is also VIP {other}",
                vip.address, vip.port, vip.protocol
            ));
        }
        if vip.backends.is_empty() {
            problems.push(format!("{at}.backends: at least one backend is required"));
        }
        if m as u64 <= 100 * vip.backends.len() as u64 {
            problems.push(format!(
                "{at}.backends: {} backends need data_plane.maglev_table_size >= 100 x {} (it is {m})",
                vip.backends.len(),
                vip.backends.len()
            ));
        }
        let mut seen = HashSet::new();
        for (j, backend) in vip.backends.iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            problems.extend(address_problem(
                &format!("{bat}.address"),
                backend.address,
                "ha-lb serves IPv4 backends only for now",
            ));
            if backend.port() == 0 {
                problems.push(format!("{bat}.port: must be 1-65535"));
            }
            if backend.weight > MAX_WEIGHT {
                problems.push(format!(
                    "{bat}.weight: {} is above {MAX_WEIGHT}",
                    backend.weight
                ));
            }
            if backend.address == vip.address {
                problems.push(format!(
                    "{bat}.address: {} is the VIP itself",
                    backend.address
                ));
            }
            if !seen.insert((backend.address, backend.port())) {
                problems.push(format!(
                    "{bat}: {}:{} is listed twice",
                    backend.address,
                    backend.port()
                ));
            }
        }
        problems.extend(check_problems(&at, &vip.check));
        if !vip.backends.is_empty() && vip.backends.iter().all(|b| b.weight == 0) {
            problems.push(format!(
                "{at}.backends: every weight is 0; at least one must be above 0"
            ));
        }
    }
    problems
}

fn garp_problems(garp: &GarpConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if garp.count > 100 {
        problems.push(format!("garp.count: {} is above 100", garp.count));
    }
    if !garp.refresh.is_zero() && garp.refresh < Duration::from_secs(1) {
        problems.push("garp.refresh: below 1s (0s turns it off)".to_string());
    }
    problems
}

/// `socket_lb.cgroup` names a directory by an absolute path (the agent's
/// working directory is no place to look for the cgroup hierarchy).
fn socket_lb_problems(socket_lb: &SocketLbConfig) -> Vec<String> {
    match &socket_lb.cgroup {
        CgroupSetting::Path(path) if !path.is_absolute() => vec![format!(
            "socket_lb.cgroup: {:?} must be `auto` or an absolute path (a cgroup2 directory, such as /sys/fs/cgroup)",
            path.display().to_string()
        )],
        _ => Vec::new(),
    }
}

/// The backend table is shared: a backend in several VIPs counts once.
fn backend_count_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let all_backends: HashSet<_> = config
        .vips
        .iter()
        .flat_map(|vip| vip.backends.iter().map(|b| (b.address, b.port())))
        .collect();
    if all_backends.len() > ha_common::MAX_BACKENDS as usize {
        problems.push(format!(
            "vips: {} distinct backends, at most {}",
            all_backends.len(),
            ha_common::MAX_BACKENDS
        ));
    }
    problems
}

fn vrrp_problems(vrrp: &VrrpConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if vrrp.vrid == 0 {
        problems.push("vrrp.vrid: must be 1-255".to_string());
    }
    if vrrp.priority == 0 {
        problems
            .push("vrrp.priority: must be 1-255 (0 is what a leaving master sends)".to_string());
    }
    let ms = vrrp.advert_interval.as_millis();
    match vrrp.version {
        VrrpVersion::V3
            if !(10..=40_950).contains(&ms)
                || !vrrp
                    .advert_interval
                    .subsec_nanos()
                    .is_multiple_of(10_000_000) =>
        {
            problems.push(format!(
                "vrrp.advert_interval: {} must be 10ms to 40.95s in steps of 10ms (version 3 counts centiseconds)",
                humantime::format_duration(vrrp.advert_interval)
            ));
        }
        VrrpVersion::V2
            if vrrp.advert_interval.subsec_nanos() != 0
                || !(1..=255).contains(&vrrp.advert_interval.as_secs()) =>
        {
            problems.push(format!(
                "vrrp.advert_interval: {} must be whole seconds 1-255 with version 2",
                humantime::format_duration(vrrp.advert_interval)
            ));
        }
        _ => {}
    }
    let hold = vrrp.restart_hold;
    if !hold.is_zero() {
        let fits = match vrrp.version {
            VrrpVersion::V3 => {
                (10..=40_950).contains(&hold.as_millis())
                    && hold.subsec_nanos().is_multiple_of(10_000_000)
            }
            VrrpVersion::V2 => hold.subsec_nanos() == 0 && (1..=255).contains(&hold.as_secs()),
        };
        if !fits || hold < vrrp.advert_interval {
            problems.push(format!(
                "vrrp.restart_hold: {} must be 0s, or at least advert_interval and an interval an advert can carry \
                 (version 3: up to 40.95s in steps of 10ms; version 2: whole seconds up to 255)",
                humantime::format_duration(hold)
            ));
        }
    }
    for peer in &vrrp.unicast_peers {
        problems.extend(address_problem(
            "vrrp.unicast_peers",
            *peer,
            "ha-lb's VRRP speaks IPv4 only for now",
        ));
    }
    if let TrackAction::Decrease(0) = vrrp.track.no_healthy_backend {
        problems.push("vrrp.track.no_healthy_backend: decrease 0 does nothing".to_string());
    }
    if let Some(TrackAction::Decrease(0)) = vrrp.track.local_backend_down {
        problems.push("vrrp.track.local_backend_down: decrease 0 does nothing".to_string());
    }
    problems
}

fn check_problems(at: &str, check: &CheckConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("{at}.check");
    if check.rise == 0 || check.fall == 0 {
        problems.push(format!("{at}: rise and fall must be at least 1"));
    }
    let minimum = Duration::from_millis(10);
    for (key, value) in [
        ("interval", check.interval),
        ("fast_interval", check.fast_interval),
        ("down_interval", check.down_interval()),
        ("timeout", check.timeout),
    ] {
        if value < minimum {
            problems.push(format!(
                "{at}.{key}: {} is below 10ms",
                humantime::format_duration(value)
            ));
        }
    }
    if check.port == Some(0) {
        problems.push(format!("{at}.port: must be 1-65535"));
    }
    if check.kind() != CheckKind::Tcp {
        if !check.path.starts_with('/') {
            problems.push(format!("{at}.path: {:?} must start with /", check.path));
        }
        if !(100..=599).contains(&check.expect_status) {
            problems.push(format!(
                "{at}.expect_status: {} is not an HTTP status",
                check.expect_status
            ));
        }
    }
    if check.client_cert.is_some() != check.client_key.is_some() {
        problems.push(format!("{at}: client_cert and client_key go together"));
    }
    if check.kind() != CheckKind::Https
        && (check.client_cert.is_some() || check.sni.is_some() || check.verify != Verify::None)
    {
        problems.push(format!(
            "{at}: verify, sni and client_cert apply to type https only"
        ));
    }
    problems
}

/// What is wrong with the address at `key`, if anything: IPv6 (refused with
/// `ipv4_only`, the reason for that field: the data path, netlink, VRRP and
/// gratuitous ARP are IPv4 for now), or not a unicast address.
fn address_problem(key: &str, address: IpAddr, ipv4_only: &str) -> Option<String> {
    match address {
        IpAddr::V6(_) => Some(format!("{key}: {address} is IPv6; {ipv4_only}")),
        IpAddr::V4(v4)
            if v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_loopback() =>
        {
            Some(format!("{key}: {address} is not a unicast address"))
        }
        IpAddr::V4(_) => None,
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{
        super::tests::{problems_of, value_problems_of},
        *,
    };

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let problems = problems_of(
            r#"
vips:
  - name: api
    address: 224.0.0.1
    port: 0
    backends: []
  - name: api
    address: 10.0.0.1
    port: 6443
    backends:
      - address: 10.0.0.2
        weight: 5000
      - address: 10.0.0.2
data_plane:
  maglev_table_size: 65536
  nat:
    port_range: 40000-30000
    source_address: 10.0.0.1
"#,
        );
        let text = problems.join("\n");
        for needle in [
            "vips[0] (api).address: 224.0.0.1 is not a unicast address",
            "vips[0] (api).port: must be 1-65535",
            "vips[0] (api).backends: at least one backend is required",
            "vips[1] (api).name: \"api\" is used by another VIP",
            "vips[1] (api).backends[0].weight: 5000 is above 1000",
            "vips[1] (api).backends[1]: 10.0.0.2:6443 is listed twice",
            "data_plane.maglev_table_size: 65536 must be a prime",
            "data_plane.nat.port_range: 40000-30000",
            "data_plane.nat.source_address: 10.0.0.1 is the address of VIP api",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn a_relative_socket_lb_cgroup_is_refused() {
        let base =
            "vips: [{name: api, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}]\n";
        let problems = value_problems_of(&format!("{base}socket_lb: {{cgroup: sys/fs/cgroup}}\n"));
        assert_eq!(
            problems,
            vec![
                "socket_lb.cgroup: \"sys/fs/cgroup\" must be `auto` or an absolute path (a cgroup2 directory, such as /sys/fs/cgroup)"
                    .to_string()
            ]
        );
        for fine in ["auto", "/sys/fs/cgroup"] {
            let text = format!("{base}socket_lb: {{cgroup: {fine}}}\n");
            assert!(Config::parse(&text, "fine").is_ok(), "{fine}");
        }
        let unknown = format!("{base}socket_lb: {{enable: true}}\n");
        assert!(
            Config::parse(&unknown, "typo").is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn table_size_below_100_per_backend_is_refused() {
        let problems = problems_of(
            r#"
vips:
  - name: api
    address: 10.0.0.1
    port: 6443
    backends: [{address: 10.0.0.2}, {address: 10.0.0.3}]
data_plane: {maglev_table_size: 199}
"#,
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains(">= 100 x 2 (it is 199)")),
            "{problems:?}"
        );
    }

    #[test]
    fn bad_checks_are_reported() {
        let problems = value_problems_of(
            r#"
vips:
  - name: api
    address: 10.0.0.1
    port: 6443
    check: {type: http, path: readyz, rise: 0, interval: 1ms, client_cert: /nonexistent.pem}
    backends: [{address: 10.0.0.2}]
"#,
        );
        let text = problems.join("\n");
        for needle in [
            "check: rise and fall must be at least 1",
            "check.interval: 1ms is below 10ms",
            "check.path: \"readyz\" must start with /",
            "check: client_cert and client_key go together",
            "check: verify, sni and client_cert apply to type https only",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(
            !text.contains("/nonexistent.pem"),
            "the files are the host's to check:\n{text}"
        );
    }

    #[test]
    fn vrrp_intervals_follow_the_version() {
        let base = "vips:\n  - {name: a, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\n";
        for (vrrp, bad) in [
            ("{vrid: 1, advert_interval: 5ms}", true),
            ("{vrid: 1, advert_interval: 15ms}", true),
            ("{vrid: 1, advert_interval: 20ms}", false),
            ("{vrid: 1, version: 2, advert_interval: 100ms}", true),
            ("{vrid: 1, version: 2, advert_interval: 1s}", false),
            ("{vrid: 0}", true),
            ("{vrid: 1, priority: 0}", true),
            ("{vrid: 1, track: {no_healthy_backend: maybe}}", true),
            ("{vrid: 1, track: {local_backend_down: decrease 0}}", true),
            ("{vrid: 1, track: {local_backend_down: decrease 60}}", false),
            ("{vrid: 1, track: {local_backend_down: fault}}", false),
            ("{vrid: 1, restart_hold: 0s}", false),
            ("{vrid: 1, restart_hold: 41s}", true),
            ("{vrid: 1, restart_hold: 50ms}", true),
            (
                "{vrid: 1, version: 2, advert_interval: 1s, restart_hold: 1500ms}",
                true,
            ),
            (
                "{vrid: 1, version: 2, advert_interval: 2s, restart_hold: 1s}",
                true,
            ),
            (
                "{vrid: 1, version: 2, advert_interval: 1s, restart_hold: 30s}",
                false,
            ),
        ] {
            let result = Config::from_yaml(&format!("{base}vrrp: {vrrp}\n"), "t");
            assert_eq!(result.is_err(), bad, "{vrrp}: {result:?}");
        }
    }

    #[test]
    fn an_ipv6_vip_address_is_refused_with_its_key() {
        let problems = value_problems_of(
            "vips:\n  - {name: api, address: 2001:db8::1, port: 6443, backends: [{address: 10.0.0.2}]}\n",
        );
        assert_eq!(
            problems,
            ["vips[0] (api).address: 2001:db8::1 is IPv6; ha-lb serves IPv4 VIPs only for now"]
        );
    }

    #[test]
    fn an_ipv6_backend_address_is_refused_with_its_key() {
        let problems = value_problems_of(
            "vips:\n  - name: api\n    address: 10.0.0.1\n    port: 6443\n    backends: [{address: 10.0.0.2}, {address: \"2001:db8::2\"}]\n",
        );
        assert_eq!(
            problems,
            [
                "vips[0] (api).backends[1].address: 2001:db8::2 is IPv6; ha-lb serves IPv4 backends only for now"
            ]
        );
    }

    #[test]
    fn an_ipv6_nat_source_is_refused_with_its_key() {
        let problems = value_problems_of(
            "vips:\n  - {name: api, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\ndata_plane: {nat: {source_address: \"2001:db8::3\"}}\n",
        );
        assert_eq!(
            problems,
            [
                "data_plane.nat.source_address: 2001:db8::3 is IPv6; ha-lb's NAT source must be IPv4 for now"
            ]
        );
    }

    #[test]
    fn an_ipv6_vrrp_peer_is_refused_with_its_key() {
        let problems = value_problems_of(
            "vips:\n  - {name: api, address: 10.0.0.1, port: 6443, backends: [{address: 10.0.0.2}]}\nvrrp: {vrid: 1, unicast_peers: [10.0.0.3, \"fe80::1\"]}\n",
        );
        assert_eq!(
            problems,
            ["vrrp.unicast_peers: fe80::1 is IPv6; ha-lb's VRRP speaks IPv4 only for now"]
        );
    }

    #[test]
    fn an_ipv4_mapped_ipv6_address_is_ipv6_too() {
        let problems = value_problems_of(
            "vips:\n  - {name: api, address: \"::ffff:10.0.0.1\", port: 6443, backends: [{address: 10.0.0.2}]}\n",
        );
        assert_eq!(
            problems,
            ["vips[0] (api).address: ::ffff:10.0.0.1 is IPv6; ha-lb serves IPv4 VIPs only for now"]
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(101) && is_prime(131071));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(100));
    }
}
