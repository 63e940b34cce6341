//! keepalived.conf's statements as the config's `vrrp` and `garp`
//! sections: the first vrrp_instance, with keepalived's own defaults
//! (VRRPv2, 1 s adverts) unless the file says otherwise.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use super::Statement;
use crate::{
    config::{GarpConfig, TrackAction, VrrpConfig, VrrpVersion},
    import::ledger::Ledger,
};

/// What a keepalived.conf gives the config: its first VRRP instance, the
/// gratuitous ARP settings, and the virtual addresses the VIPs may take.
pub(crate) struct KeepalivedPart {
    /// Each virtual address and its line.
    pub(crate) vip_lines: Vec<(Ipv4Addr, usize)>,
    pub(crate) vrrp: Option<VrrpConfig>,
    pub(crate) garp: GarpConfig,
    /// The instance's `interface`: what `ha-user attach --iface` should name.
    pub(crate) interface: Option<String>,
}

fn seconds(text: &str) -> Option<Duration> {
    let value: f64 = text.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| Duration::from_secs_f64(value))
}

pub(crate) fn translate(file: &str, tree: &[Statement], ledger: &mut Ledger) -> KeepalivedPart {
    let mut part = KeepalivedPart {
        vip_lines: Vec::new(),
        vrrp: None,
        garp: GarpConfig::default(),
        interface: None,
    };
    // keepalived's defaults, not ha-lb's: VRRPv2, 1 s adverts.
    let mut version = VrrpVersion::V2;
    let mut scripts: BTreeMap<String, i32> = BTreeMap::new();
    for statement in tree {
        match statement.keyword() {
            "global_defs" => {
                ledger.consume(file, statement.line);
                for setting in statement.children() {
                    let value = setting.word(1).unwrap_or("");
                    let used = match setting.keyword() {
                        "vrrp_version" => match value {
                            "2" => {
                                version = VrrpVersion::V2;
                                true
                            }
                            "3" => {
                                version = VrrpVersion::V3;
                                true
                            }
                            _ => false,
                        },
                        "vrrp_garp_master_repeat" => value
                            .parse()
                            .map(|n| part.garp.count = n)
                            .is_ok(),
                        "vrrp_garp_interval" => seconds(value)
                            .map(|d| part.garp.interval = d)
                            .is_some(),
                        "vrrp_garp_master_refresh" => seconds(value)
                            .map(|d| part.garp.refresh = d)
                            .is_some(),
                        _ => false,
                    };
                    if used {
                        ledger.consume(file, setting.line);
                    }
                }
            }
            "vrrp_script" => {
                let name = statement.word(1).unwrap_or("").to_string();
                let weight = statement
                    .children()
                    .iter()
                    .find(|s| s.keyword() == "weight")
                    .and_then(|s| s.word(1))
                    .and_then(|w| w.parse().ok())
                    .unwrap_or(0);
                scripts.insert(name, weight);
                ledger.note(
                    file,
                    statement.line,
                    statement.text(),
                    "ha-lb runs no scripts: its own backend checks drive vrrp.track.local_backend_down (this host's own backend, the local apiserver) and no_healthy_backend",
                );
                for child in statement.children() {
                    ledger.consume(file, child.line);
                }
            }
            "vrrp_instance" if part.vrrp.is_none() => {
                ledger.consume(file, statement.line);
                part.vrrp = Some(translate_instance(
                    file, statement, version, &scripts, &mut part, ledger,
                ));
            }
            "vrrp_instance" => ledger.note(
                file,
                statement.line,
                statement.text(),
                "ha-lb runs one VRRP instance for all its VIPs: only the first vrrp_instance is imported",
            ),
            _ => {}
        }
    }
    // A `vrrp_version` in global_defs may come after the instance.
    if let Some(vrrp) = part.vrrp.as_mut() {
        vrrp.version = version;
    }
    part
}

fn translate_instance(
    file: &str,
    instance: &Statement,
    version: VrrpVersion,
    scripts: &BTreeMap<String, i32>,
    part: &mut KeepalivedPart,
    ledger: &mut Ledger,
) -> VrrpConfig {
    // keepalived's own defaults where they differ from ha-lb's.
    let mut vrrp = VrrpConfig {
        version,
        advert_interval: Duration::from_secs(1),
        ..VrrpConfig::new(0)
    };
    let mut tracked_weights = Vec::new();
    for setting in instance.children() {
        let value = setting.word(1).unwrap_or("");
        let used = match setting.keyword() {
            "interface" => {
                part.interface = Some(value.to_string());
                true
            }
            "virtual_router_id" => value.parse().map(|v| vrrp.vrid = v).is_ok(),
            "priority" => value.parse().map(|v| vrrp.priority = v).is_ok(),
            "advert_int" => seconds(value).map(|d| vrrp.advert_interval = d).is_some(),
            "nopreempt" => {
                vrrp.preempt = false;
                true
            }
            "preempt_delay" => seconds(value).map(|d| vrrp.preempt_delay = d).is_some(),
            "garp_master_repeat" => value.parse().map(|n| part.garp.count = n).is_ok(),
            "garp_master_refresh" => seconds(value).map(|d| part.garp.refresh = d).is_some(),
            "garp_interval" => seconds(value).map(|d| part.garp.interval = d).is_some(),
            "version" => match value {
                "2" => {
                    vrrp.version = VrrpVersion::V2;
                    true
                }
                "3" => {
                    vrrp.version = VrrpVersion::V3;
                    true
                }
                _ => false,
            },
            "unicast_peer" => {
                for peer in setting.children() {
                    match peer.keyword().parse::<IpAddr>() {
                        Ok(address @ IpAddr::V4(_)) => {
                            vrrp.unicast_peers.push(address);
                            ledger.consume(file, peer.line);
                        }
                        Ok(IpAddr::V6(_)) => ledger.note(
                            file,
                            peer.line,
                            peer.text(),
                            "IPv6 peer: ha-lb's VRRP speaks IPv4 only for now; not carried over",
                        ),
                        Err(_) => ledger.note(
                            file,
                            peer.line,
                            peer.text(),
                            "not an IPv4 address (ha-lb is IPv4 only)",
                        ),
                    }
                }
                true
            }
            "virtual_ipaddress" => {
                for address in setting.children() {
                    let text = address.keyword();
                    match text.split('/').next().unwrap_or("").parse::<IpAddr>() {
                        Ok(IpAddr::V6(_)) => ledger.note(
                            file,
                            address.line,
                            address.text(),
                            "IPv6 address: ha-lb serves IPv4 VIPs only for now; not carried over",
                        ),
                        Ok(IpAddr::V4(ip)) => {
                            part.vip_lines.push((ip, address.line));
                            ledger.consume(file, address.line);
                            let extra = &address.words[1..];
                            let on_interface = part
                                .interface
                                .as_ref()
                                .is_some_and(|i| extra == [String::from("dev"), i.clone()]);
                            if !extra.is_empty() && !on_interface {
                                ledger.note(
                                    file,
                                    address.line,
                                    address.text(),
                                    "the address is taken as a /32 on the attach interface; device, label and scope options are not carried over",
                                );
                            }
                        }
                        Err(_) => ledger.note(
                            file,
                            address.line,
                            address.text(),
                            "not an IPv4 address (ha-lb is IPv4 only)",
                        ),
                    }
                }
                true
            }
            "track_script" => {
                for script in setting.children() {
                    ledger.consume(file, script.line);
                    tracked_weights.push(scripts.get(script.keyword()).copied().unwrap_or(0));
                }
                true
            }
            _ => false,
        };
        if used {
            ledger.consume(file, setting.line);
        }
    }
    // A tracked script that fails lowers the priority by its weight, or
    // (weight 0) puts the instance in fault. The classic guides' script
    // checks this host's own apiserver (the stacked layout): ha-lb's
    // equivalent is `local_backend_down`, its own check of the backend at
    // this host's address. On a dedicated LB host (no local backend) that
    // rule never fires, so the same action also goes to
    // `no_healthy_backend`, ha-lb's view of every backend.
    if !tracked_weights.is_empty() {
        let action = match tracked_weights.iter().map(|w| w.unsigned_abs()).max() {
            Some(0) | None => TrackAction::Fault,
            Some(w) => TrackAction::Decrease(w.min(254) as u8),
        };
        vrrp.track.no_healthy_backend = action;
        vrrp.track.local_backend_down = Some(action);
    }
    vrrp.restart_hold = vrrp.restart_hold.max(vrrp.advert_interval);
    vrrp
}

/// Lists every statement the translation did not consume, with the reason.
pub(crate) fn note_unconsumed(file: &str, tree: &[Statement], ledger: &mut Ledger) {
    for statement in tree {
        if !ledger.is_consumed(file, statement.line) {
            let why = reason(statement.keyword());
            ledger.note(file, statement.line, statement.text(), why);
            continue;
        }
        note_unconsumed(file, statement.children(), ledger);
    }
}

fn reason(keyword: &str) -> &'static str {
    match keyword {
        "router_id" => {
            "names the host in keepalived's logs and mail; ha-lb's logs carry the host name"
        }
        "state" => "ha-lb elects by priority alone; the starting state is not configured",
        "authentication" => {
            "VRRP authentication is gone from the protocol (RFC 3768, 5798); ha-lb sends none, so drop it from keepalived peers that must interoperate"
        }
        "unicast_src_ip" => "ha-lb sends adverts from the VRRP interface's primary address",
        "track_interface" => {
            "ha-lb tracks the attach interface's link and its XDP program (fault when either is lost)"
        }
        "notify" | "notify_master" | "notify_backup" | "notify_fault" | "notify_stop" => {
            "ha-lb runs no notify scripts: the VRRP state is in `ha-user status`, the log and /metrics"
        }
        "enable_script_security" | "script_user" => "ha-lb runs no scripts",
        "virtual_server" | "virtual_server_group" => {
            "LVS virtual servers: describe them as ha-lb vips instead"
        }
        "vrrp_sync_group" => "ha-lb runs one VRRP instance: nothing to synchronise",
        "include" => "included files are not read: import their content explicitly",
        _ => "not supported by ha-lb",
    }
}
