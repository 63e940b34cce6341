use std::{path::PathBuf, time::Duration};

use super::*;
use crate::config::{CheckKind, TrackAction, Verify, VipConfig, VrrpVersion};

const STATIC_PODS_HAPROXY: &str =
    include_str!("../../tests/fixtures/import/kubeadm-static-pods/haproxy.cfg");
const STATIC_PODS_KEEPALIVED: &str =
    include_str!("../../tests/fixtures/import/kubeadm-static-pods/keepalived.conf");
const DEDICATED_HAPROXY: &str =
    include_str!("../../tests/fixtures/import/dedicated-lb/haproxy.cfg");
const DEDICATED_KEEPALIVED: &str =
    include_str!("../../tests/fixtures/import/dedicated-lb/keepalived.conf");

fn run(haproxy: &str, keepalived: Option<&str>) -> Result<Imported, ImportError> {
    import(
        &Source {
            name: "haproxy.cfg",
            text: haproxy,
        },
        keepalived
            .map(|text| Source {
                name: "keepalived.conf",
                text,
            })
            .as_ref(),
    )
}

fn noted(imported: &Imported, at: &str, directive: &str) -> bool {
    imported
        .notes
        .iter()
        .any(|n| n.at() == at && n.directive.contains(directive))
}

fn backends(vip: &VipConfig) -> Vec<(String, Option<u16>, u32)> {
    vip.backends
        .iter()
        .map(|b| (b.address.to_string(), b.port, b.weight))
        .collect()
}

#[test]
fn the_kubeadm_guide_becomes_one_vip_with_its_vrrp_instance() {
    let imported = run(STATIC_PODS_HAPROXY, Some(STATIC_PODS_KEEPALIVED)).unwrap();
    let config = &imported.config;
    assert_eq!(config.vips.len(), 1);
    let vip = &config.vips[0];
    assert_eq!(
        (vip.name.as_str(), vip.address.to_string(), vip.port),
        ("apiserver", "192.0.2.100".to_string(), 8443)
    );
    assert_eq!(
        backends(vip),
        [
            ("192.0.2.11".to_string(), Some(6443), 1),
            ("192.0.2.12".to_string(), Some(6443), 1),
            ("192.0.2.13".to_string(), Some(6443), 1),
        ]
    );
    // `option ssl-hello-chk` comes after `option httpchk`, and in haproxy the
    // last check option wins: the guide's backend is checked by a TLS hello.
    let check = &vip.check;
    assert_eq!(check.kind, Some(CheckKind::Tcp));
    assert!(noted(
        &imported,
        "haproxy.cfg:43",
        "backend apiserverbackend"
    ));
    // haproxy's defaults: inter 2s, rise 2, fall 3; `timeout check 10s`.
    assert_eq!(
        (check.interval, check.fast_interval, check.down_interval),
        (Duration::from_secs(2), Duration::from_secs(2), None)
    );
    assert_eq!((check.rise, check.fall), (2, 3));
    assert_eq!(check.timeout, Duration::from_secs(10));

    let vrrp = config.vrrp.as_ref().unwrap();
    assert_eq!((vrrp.vrid, vrrp.priority), (51, 101));
    // keepalived's own defaults, so ha-lb can join the running pair.
    assert_eq!(vrrp.version, VrrpVersion::V2);
    assert_eq!(vrrp.advert_interval, Duration::from_secs(1));
    assert!(vrrp.preempt);
    assert!(vrrp.unicast_peers.is_empty());
    // The tracked script (the local apiserver's check) and its weight -2
    // become the local-backend rule's decrease, and the same for every
    // backend down.
    assert_eq!(
        vrrp.track.local_backend_down,
        Some(TrackAction::Decrease(2))
    );
    assert_eq!(vrrp.track.no_healthy_backend, TrackAction::Decrease(2));
    assert_eq!(imported.interface.as_deref(), Some("eth0"));

    for (at, directive) in [
        ("haproxy.cfg:6", "log /dev/log local0"),
        ("haproxy.cfg:15", "mode http"),
        ("haproxy.cfg:21", "option redispatch"),
        ("haproxy.cfg:26", "timeout client 20s"),
        ("haproxy.cfg:48", "balance roundrobin"),
        ("keepalived.conf:4", "router_id LVS_DEVEL"),
        ("keepalived.conf:6", "vrrp_script check_apiserver"),
        ("keepalived.conf:15", "state MASTER"),
        ("keepalived.conf:19", "authentication"),
    ] {
        assert!(
            noted(&imported, at, directive),
            "{at} {directive} not listed"
        );
    }
    // Translated lines are not listed.
    for at in [
        "haproxy.cfg:29",
        "haproxy.cfg:35",
        "haproxy.cfg:49",
        "keepalived.conf:17",
        "keepalived.conf:18",
        "keepalived.conf:24",
    ] {
        assert!(!imported.notes.iter().any(|n| n.at() == at), "{at} listed");
    }
}

#[test]
fn dedicated_lbs_carry_weights_timings_client_certs_and_unicast_vrrp() {
    let imported = run(DEDICATED_HAPROXY, Some(DEDICATED_KEEPALIVED)).unwrap();
    let config = &imported.config;
    let names: Vec<(&str, String, u16)> = config
        .vips
        .iter()
        .map(|v| (v.name.as_str(), v.address.to_string(), v.port))
        .collect();
    assert_eq!(
        names,
        [
            ("apiserver", "198.51.100.100".to_string(), 6443),
            ("etcd", "198.51.100.100".to_string(), 2379)
        ]
    );
    let (api, etcd) = (&config.vips[0], &config.vips[1]);
    assert_eq!(
        backends(api),
        [
            ("198.51.100.11".to_string(), Some(6443), 100),
            ("198.51.100.12".to_string(), Some(6443), 100),
            ("198.51.100.13".to_string(), Some(6443), 50),
        ]
    );
    assert_eq!(api.check.kind, Some(CheckKind::Https));
    assert_eq!(api.check.path, "/readyz");
    assert_eq!(api.check.expect_status, 200);
    assert_eq!(api.check.verify, Verify::None);
    for check in [&api.check, &etcd.check] {
        assert_eq!(check.interval, Duration::from_secs(2));
        assert_eq!(check.fast_interval, Duration::from_millis(500));
        assert_eq!(check.down_interval, Some(Duration::from_secs(5)));
        assert_eq!(check.timeout, Duration::from_secs(3));
        assert_eq!((check.rise, check.fall), (2, 3));
    }
    assert_eq!(etcd.check.kind, Some(CheckKind::Https));
    assert_eq!(etcd.check.path, "/health");
    assert_eq!(
        etcd.check.expect_body.as_deref(),
        Some(r#""health":"true""#)
    );
    // ca-base and crt-base resolve the relative files; haproxy's `crt` PEM
    // holds the certificate and its key.
    assert_eq!(
        etcd.check.verify,
        Verify::CaFile("/etc/kubernetes/pki/etcd/ca.crt".into())
    );
    let client = Some(PathBuf::from("/etc/haproxy/certs/etcd-client.pem"));
    assert_eq!(
        (&etcd.check.client_cert, &etcd.check.client_key),
        (&client, &client)
    );
    assert_eq!(etcd.backends.len(), 3);

    let vrrp = config.vrrp.as_ref().unwrap();
    assert_eq!((vrrp.vrid, vrrp.priority), (60, 150));
    assert_eq!(vrrp.version, VrrpVersion::V3);
    assert_eq!(vrrp.advert_interval, Duration::from_millis(500));
    assert_eq!(vrrp.preempt_delay, Duration::from_secs(5));
    assert_eq!(
        vrrp.unicast_peers,
        ["198.51.100.6".parse::<Ipv4Addr>().unwrap()]
    );
    assert_eq!(vrrp.track.no_healthy_backend, TrackAction::Decrease(20));
    assert_eq!(
        vrrp.track.local_backend_down,
        Some(TrackAction::Decrease(20))
    );
    assert_eq!(config.garp.count, 3);
    assert_eq!(config.garp.refresh, Duration::from_secs(60));
    assert_eq!(imported.interface.as_deref(), Some("ens33"));

    for (at, directive) in [
        ("haproxy.cfg:44", "balance leastconn"),
        ("haproxy.cfg:50", "bind 127.0.0.1:8404"),
        ("haproxy.cfg:52", "stats enable"),
        ("keepalived.conf:24", "unicast_src_ip"),
        ("keepalived.conf:34", "notify_master"),
    ] {
        assert!(
            noted(&imported, at, directive),
            "{at} {directive} not listed"
        );
    }
}

#[test]
fn unsupported_server_options_and_routing_are_listed() {
    let haproxy = "\
frontend api
    bind 10.0.0.100:6443
    acl internal src 10.0.0.0/8
    use_backend other if internal
    default_backend api
backend api
    stick-table type ip size 200k expire 30m
    server a 10.0.0.11:6443 check send-proxy maxconn 100 weight 3
    server b 10.0.0.12:6443 check backup
    server c apiserver-3.example:6443 check
    server d 10.0.0.14:6443 check inter 5s
";
    let imported = run(haproxy, None).unwrap();
    let vip = &imported.config.vips[0];
    assert_eq!(vip.address.to_string(), "10.0.0.100");
    assert!(imported.config.vrrp.is_none());
    assert_eq!(
        backends(vip),
        [
            ("10.0.0.11".to_string(), Some(6443), 3),
            ("10.0.0.14".to_string(), Some(6443), 1)
        ]
    );
    for (at, directive) in [
        ("haproxy.cfg:3", "acl internal"),
        ("haproxy.cfg:4", "use_backend other"),
        ("haproxy.cfg:7", "stick-table"),
        ("haproxy.cfg:8", "send-proxy"),
        ("haproxy.cfg:8", "maxconn 100"),
        ("haproxy.cfg:9", "backup"),
        ("haproxy.cfg:10", "apiserver-3.example"),
        ("haproxy.cfg:11", "server d"),
    ] {
        assert!(
            noted(&imported, at, directive),
            "{at} {directive} not listed"
        );
    }
}

#[test]
fn a_wildcard_bind_needs_keepalived_for_its_address() {
    let haproxy = "frontend api\n    bind *:6443\n    default_backend api\nbackend api\n    server a 10.0.0.11:6443 check\n";
    let error = run(haproxy, None).err().unwrap().to_string();
    assert!(error.contains("haproxy.cfg:2"), "{error}");
    assert!(error.contains("--keepalived"), "{error}");
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let error = run("global\n  log \"x\n", None).err().unwrap().to_string();
    assert_eq!(error, "haproxy.cfg: line 2: unterminated quote");
    let error = run(STATIC_PODS_HAPROXY, Some("vrrp_instance a {\n"))
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        error,
        "keepalived.conf: the block opened on line 1 is never closed"
    );
    let error = run("defaults\n  mode tcp\n", None)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("no frontend or listen section"), "{error}");
}

#[test]
fn the_rendered_yaml_reads_back_as_the_same_config() {
    let imported = run(STATIC_PODS_HAPROXY, Some(STATIC_PODS_KEEPALIVED)).unwrap();
    let yaml = render(&imported, &["haproxy.cfg", "keepalived.conf"]);
    assert!(yaml.starts_with("# ha-lb config imported by `ha-user import`"));
    assert!(yaml.contains("#   keepalived.conf:19  `authentication { ... }`"));
    assert!(yaml.contains("ha-user attach --iface eth0"));
    let back = Config::from_yaml(&yaml, "imported").unwrap();
    assert_eq!(back.vips[0].backends.len(), 3);
    assert_eq!(back.vips[0].check, imported.config.vips[0].check);
    assert_eq!(back.vrrp, imported.config.vrrp);

    let imported = run(DEDICATED_HAPROXY, Some(DEDICATED_KEEPALIVED)).unwrap();
    let yaml = render(&imported, &["haproxy.cfg", "keepalived.conf"]);
    // The certificate files are the LB hosts': the values alone are validated.
    let back = Config::parse(&yaml, "imported").unwrap();
    assert_eq!(back.vips, imported.config.vips);
    assert_eq!(back.vrrp, imported.config.vrrp);
    assert_eq!(back.garp, imported.config.garp);
}

#[test]
fn ipv6_binds_servers_and_keepalived_addresses_are_noted_not_carried_over() {
    let haproxy = "\
frontend api
    bind 10.0.0.100:6443
    bind [2001:db8::100]:6443
    bind ipv6@2001:db8::101:6443
    default_backend api
backend api
    server a 10.0.0.11:6443 check
    server b [2001:db8::12]:6443 check
    server c ipv6@2001:db8::13:6443 check
";
    let keepalived = "\
vrrp_instance VI_1 {
    interface eth0
    virtual_router_id 51
    unicast_peer {
        10.0.0.3
        2001:db8::3
    }
    virtual_ipaddress {
        10.0.0.100
        2001:db8::100/64
    }
}
";
    let imported = run(haproxy, Some(keepalived)).unwrap();
    let vips = &imported.config.vips;
    assert_eq!(vips.len(), 1, "{vips:?}");
    assert_eq!(vips[0].address.to_string(), "10.0.0.100");
    assert_eq!(
        backends(&vips[0]),
        [("10.0.0.11".to_string(), Some(6443), 1)]
    );
    let peers = &imported.config.vrrp.as_ref().unwrap().unicast_peers;
    assert_eq!(peers, &[std::net::IpAddr::from([10, 0, 0, 3])]);
    for (at, directive, why) in [
        (
            "haproxy.cfg:3",
            "[2001:db8::100]:6443",
            "IPv6 bind: ha-lb serves IPv4 VIPs only for now",
        ),
        ("haproxy.cfg:4", "ipv6@2001:db8::101:6443", "IPv6 bind"),
        (
            "haproxy.cfg:8",
            "server b",
            "IPv6 server: ha-lb serves IPv4 backends only for now",
        ),
        ("haproxy.cfg:9", "server c", "IPv6 server"),
        (
            "keepalived.conf:6",
            "2001:db8::3",
            "IPv6 peer: ha-lb's VRRP speaks IPv4 only for now",
        ),
        (
            "keepalived.conf:10",
            "2001:db8::100/64",
            "IPv6 address: ha-lb serves IPv4 VIPs only for now",
        ),
    ] {
        assert!(
            imported
                .notes
                .iter()
                .any(|n| n.at() == at && n.directive.contains(directive) && n.why.contains(why)),
            "{at} {directive} not noted with {why:?}: {:#?}",
            imported.notes
        );
    }
}

#[test]
fn a_frontend_bound_to_ipv6_only_says_why_it_has_no_vip() {
    let haproxy = "\
frontend api
    bind [2001:db8::100]:6443
    default_backend api
backend api
    server a 10.0.0.11:6443 check
";
    let error = run(haproxy, None).err().unwrap().to_string();
    assert!(
        error.contains("with an IPv4 bind")
            && error.contains("IPv6 binds and servers are not carried over"),
        "{error}"
    );
}
