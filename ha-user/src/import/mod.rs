//! `ha-user import`: turns a haproxy.cfg and a keepalived.conf into the
//! equivalent ha-lb config.
//!
//! The translation is faithful rather than idiomatic: the same VIPs,
//! backends, weights, check timings and VRRP settings (keepalived's VRRPv2
//! and 1 s adverts stay unless the file said otherwise), so an ha-lb host
//! can join a running keepalived pair during a migration. Every line of
//! either file is either consumed by the translation or listed with the
//! reason it was not carried over; nothing is dropped silently.
//!
//! Hand-written parsers: no maintained crate parses either format (the
//! crates.io haproxy parsers cover a subset and are unmaintained), and both
//! syntaxes are small.

pub mod haproxy;
pub mod keepalived;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::config::{
    BackendConfig, CheckConfig, CheckKind, Config, GarpConfig, Mode, Protocol, TrackAction,
    TrackConfig, Verify, VipConfig, VrrpConfig, VrrpVersion,
};

/// One input file: the name used in notes, and its text.
pub struct Source<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// A directive that was not carried over, or carried over with a change.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Note {
    pub file: String,
    pub line: usize,
    pub directive: String,
    pub why: String,
}

impl Note {
    /// `file:line`, as editors and compilers name a place.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

pub struct Imported {
    pub config: Config,
    /// keepalived's `interface`: what `ha-user attach --iface` should name.
    pub interface: Option<String>,
    pub notes: Vec<Note>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}: {source}")]
    Haproxy {
        file: String,
        #[source]
        source: haproxy::ParseError,
    },
    #[error("{file}: {source}")]
    Keepalived {
        file: String,
        #[source]
        source: keepalived::ParseError,
    },
    #[error(
        "{at}: frontend {frontend} binds {bind}, which names no address; give the keepalived.conf \
         whose virtual_ipaddress is the VIP (--keepalived)"
    )]
    NoVipAddress {
        at: String,
        frontend: String,
        bind: String,
    },
    #[error("{0}: no frontend or listen section sends traffic to servers with IPv4 addresses")]
    NothingToBalance(String),
}

/// Lines consumed by the translation and notes about the rest.
#[derive(Default)]
struct Ledger {
    consumed: BTreeSet<(String, usize)>,
    notes: Vec<Note>,
}

impl Ledger {
    fn consume(&mut self, file: &str, line: usize) {
        self.consumed.insert((file.to_string(), line));
    }

    fn note(&mut self, file: &str, line: usize, directive: impl Into<String>, why: &str) {
        self.consume(file, line);
        self.notes.push(Note {
            file: file.to_string(),
            line,
            directive: directive.into(),
            why: why.to_string(),
        });
    }

    fn is_consumed(&self, file: &str, line: usize) -> bool {
        self.consumed.contains(&(file.to_string(), line))
    }
}

pub fn import(
    haproxy_source: &Source<'_>,
    keepalived_source: Option<&Source<'_>>,
) -> Result<Imported, ImportError> {
    let mut ledger = Ledger::default();
    let keepalived_tree = match keepalived_source {
        Some(source) => {
            Some(
                keepalived::parse(source.text).map_err(|e| ImportError::Keepalived {
                    file: source.name.to_string(),
                    source: e,
                })?,
            )
        }
        None => None,
    };
    let vrrp_part = match (keepalived_source, &keepalived_tree) {
        (Some(source), Some(tree)) => Some(translate_keepalived(source.name, tree, &mut ledger)),
        _ => None,
    };
    let sections = haproxy::parse(haproxy_source.text).map_err(|e| ImportError::Haproxy {
        file: haproxy_source.name.to_string(),
        source: e,
    })?;
    let keepalived_vips: Vec<Ipv4Addr> = vrrp_part
        .iter()
        .flat_map(|p| &p.vip_lines)
        .map(|(address, _)| *address)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let vips = translate_haproxy(
        haproxy_source.name,
        &sections,
        &keepalived_vips,
        &mut ledger,
    )?;
    if vips.is_empty() {
        return Err(ImportError::NothingToBalance(
            haproxy_source.name.to_string(),
        ));
    }
    if let (Some(source), Some(part)) = (keepalived_source, &vrrp_part) {
        for (address, line) in &part.vip_lines {
            if !vips.iter().any(|v| v.address == *address) {
                ledger.note(
                    source.name,
                    *line,
                    address.to_string(),
                    "virtual address that no haproxy frontend serves: not carried over",
                );
            }
        }
    }

    // Whatever the translation did not consume is listed with a reason.
    for section in &sections {
        for line in &section.lines {
            if !ledger.is_consumed(haproxy_source.name, line.number) {
                let why = haproxy_reason(section, line);
                ledger.note(haproxy_source.name, line.number, line.text(), why);
            }
        }
    }
    if let (Some(source), Some(tree)) = (keepalived_source, &keepalived_tree) {
        note_unconsumed_statements(source.name, tree, &mut ledger);
    }

    let mut notes = ledger.notes;
    notes.sort();
    notes.dedup();
    let (vrrp, garp, interface) = match vrrp_part {
        Some(part) => (part.vrrp, part.garp, part.interface),
        None => (None, GarpConfig::default(), None),
    };
    Ok(Imported {
        config: Config {
            vips,
            data_plane: Default::default(),
            vrrp,
            garp,
            telemetry: Default::default(),
        },
        interface,
        notes,
    })
}

// --- keepalived -------------------------------------------------------------

struct KeepalivedPart {
    /// Each virtual address and its line.
    vip_lines: Vec<(Ipv4Addr, usize)>,
    vrrp: Option<VrrpConfig>,
    garp: GarpConfig,
    interface: Option<String>,
}

fn seconds(text: &str) -> Option<Duration> {
    let value: f64 = text.parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| Duration::from_secs_f64(value))
}

fn translate_keepalived(
    file: &str,
    tree: &[keepalived::Statement],
    ledger: &mut Ledger,
) -> KeepalivedPart {
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
                    "ha-lb runs no scripts: its own backend checks drive vrrp.track.no_healthy_backend",
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
    instance: &keepalived::Statement,
    version: VrrpVersion,
    scripts: &BTreeMap<String, i32>,
    part: &mut KeepalivedPart,
    ledger: &mut Ledger,
) -> VrrpConfig {
    let mut vrrp = VrrpConfig {
        interface: None,
        vrid: 0,
        priority: 100,
        version,
        advert_interval: Duration::from_secs(1),
        preempt: true,
        preempt_delay: Duration::ZERO,
        restart_hold: Duration::from_secs(10),
        unicast_peers: Vec::new(),
        checksum: Default::default(),
        track: TrackConfig::default(),
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
                    match peer.keyword().parse::<Ipv4Addr>() {
                        Ok(address) => {
                            vrrp.unicast_peers.push(address);
                            ledger.consume(file, peer.line);
                        }
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
                    match text.split('/').next().unwrap_or("").parse::<Ipv4Addr>() {
                        Ok(ip) => {
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
    // (weight 0) puts the instance in fault: ha-lb's nearest equivalent is
    // tracking its own view of the backends.
    if !tracked_weights.is_empty() {
        vrrp.track.no_healthy_backend = match tracked_weights.iter().map(|w| w.unsigned_abs()).max()
        {
            Some(0) | None => TrackAction::Fault,
            Some(w) => TrackAction::Decrease(w.min(254) as u8),
        };
    }
    vrrp.restart_hold = vrrp.restart_hold.max(vrrp.advert_interval);
    vrrp
}

fn note_unconsumed_statements(file: &str, tree: &[keepalived::Statement], ledger: &mut Ledger) {
    for statement in tree {
        if !ledger.is_consumed(file, statement.line) {
            let why = keepalived_reason(statement.keyword());
            ledger.note(file, statement.line, statement.text(), why);
            continue;
        }
        note_unconsumed_statements(file, statement.children(), ledger);
    }
}

fn keepalived_reason(keyword: &str) -> &'static str {
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

// --- haproxy -----------------------------------------------------------------

fn haproxy_reason(section: &haproxy::Section, line: &haproxy::Line) -> &'static str {
    let keyword = line.word(0).unwrap_or("");
    let second = line.word(1).unwrap_or("");
    if section.kind == "global" {
        return match keyword {
            "log" => "the agent logs to stderr (journald, kubectl logs)",
            "stats" => "the agent's state is in `ha-user status` and on /metrics",
            _ => "process setting of haproxy; ha-lb runs under systemd or the kubelet",
        };
    }
    match (keyword, second) {
        ("log", _) | ("option", "httplog" | "tcplog" | "dontlognull" | "log-health-checks") => {
            "the agent logs to stderr; per-connection logs have no equivalent in the kernel data path"
        }
        ("mode", "http") => {
            "ha-lb balances TCP connections (layer 4): HTTP-mode features are not carried over"
        }
        ("timeout", "check") => {
            "no imported backend inherits it, or its value is not a haproxy time"
        }
        ("timeout", _) => {
            "proxy timeout: ha-lb forwards packets and expires idle flows after data_plane.conntrack.tcp_idle_timeout"
        }
        ("retries", _) | ("option", "redispatch") => {
            "ha-lb does not retry connections: the checks take a dead backend out"
        }
        ("balance", _) => "ha-lb spreads connections by weighted Maglev consistent hashing",
        ("option", "forwardfor" | "http-server-close" | "http-keep-alive" | "httpclose") => {
            "HTTP proxying: ha-lb does not parse HTTP"
        }
        ("stick-table" | "stick", _) => {
            "stickiness: ha-lb keeps each connection on its backend, and Maglev keeps a client's new connections mostly on the same one"
        }
        ("maxconn", _) => "connection limits are not enforced by ha-lb",
        ("stats", _) => "the agent's state is in `ha-user status` and on /metrics",
        ("bind" | "default_backend", _) => {
            "this frontend was not imported: its backend has no server with an IPv4 address"
        }
        ("server", _) => "not imported: its proxy was not imported",
        ("use_backend", _) | ("acl", _) => {
            "content switching is not supported: one backend per VIP"
        }
        ("http-check" | "option" | "tcp-check", _) => "this check form is not supported by ha-lb",
        _ => "not supported by ha-lb",
    }
}

/// What a `server` or `default-server` line says.
#[derive(Clone, Debug, Default)]
struct ServerParams {
    check: bool,
    ssl: bool,
    check_ssl: bool,
    verify: Option<String>,
    ca_file: Option<String>,
    crt: Option<String>,
    sni: Option<String>,
    port: Option<u16>,
    inter: Option<Duration>,
    fastinter: Option<Duration>,
    downinter: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    weight: Option<u32>,
    backup: bool,
    disabled: bool,
    unsupported: Vec<String>,
}

/// Server keywords that take a value, so an unsupported one skips it.
const VALUE_KEYWORDS: &[&str] = &[
    "addr",
    "agent-addr",
    "agent-inter",
    "agent-port",
    "agent-send",
    "alpn",
    "check-alpn",
    "check-proto",
    "ciphers",
    "ciphersuites",
    "cookie",
    "crl-file",
    "error-limit",
    "id",
    "init-addr",
    "log-proto",
    "max-reuse",
    "maxconn",
    "maxqueue",
    "minconn",
    "namespace",
    "observe",
    "on-error",
    "on-marked-down",
    "on-marked-up",
    "pool-max-conn",
    "pool-purge-delay",
    "proto",
    "redir",
    "resolve-net",
    "resolve-prefer",
    "resolvers",
    "shard",
    "slowstart",
    "source",
    "ssl-max-ver",
    "ssl-min-ver",
    "tcp-ut",
    "track",
];

/// The per-server settings that ha-lb keeps per VIP.
type CheckSettings<'a> = (
    [Option<Duration>; 3],
    [Option<u32>; 2],
    Option<u16>,
    [&'a Option<String>; 4],
    bool,
);

impl ServerParams {
    fn check_settings(&self) -> CheckSettings<'_> {
        (
            [self.inter, self.fastinter, self.downinter],
            [self.rise, self.fall],
            self.port,
            [&self.verify, &self.ca_file, &self.crt, &self.sni],
            self.check_ssl || self.ssl,
        )
    }

    fn apply(&mut self, words: &[String]) {
        let mut i = 0;
        while i < words.len() {
            let word = words[i].as_str();
            let value = words.get(i + 1).map(String::as_str);
            let flag = match word {
                "check" => Some((&mut self.check, true)),
                "no-check" => Some((&mut self.check, false)),
                "ssl" => Some((&mut self.ssl, true)),
                "check-ssl" => Some((&mut self.check_ssl, true)),
                "backup" => Some((&mut self.backup, true)),
                "disabled" => Some((&mut self.disabled, true)),
                "enabled" => Some((&mut self.disabled, false)),
                _ => None,
            };
            if let Some((field, on)) = flag {
                *field = on;
                i += 1;
                continue;
            }
            let mut takes_value = true;
            match (word, value) {
                ("verify", Some(v)) => self.verify = Some(v.to_string()),
                ("ca-file", Some(v)) => self.ca_file = Some(v.to_string()),
                ("crt", Some(v)) => self.crt = Some(v.to_string()),
                ("check-sni", Some(v)) => self.sni = Some(v.to_string()),
                ("sni", Some(v)) => {
                    match v.strip_prefix("str(").and_then(|s| s.strip_suffix(')')) {
                        Some(name) => self.sni = Some(name.to_string()),
                        None => self.unsupported.push(format!("sni {v}")),
                    }
                }
                ("port", Some(v)) => match v.parse() {
                    Ok(p) => self.port = Some(p),
                    Err(_) => self.unsupported.push(format!("port {v}")),
                },
                ("inter", Some(v)) => self.inter = haproxy::duration(v),
                ("fastinter", Some(v)) => self.fastinter = haproxy::duration(v),
                ("downinter", Some(v)) => self.downinter = haproxy::duration(v),
                ("rise", Some(v)) => self.rise = v.parse().ok(),
                ("fall", Some(v)) => self.fall = v.parse().ok(),
                ("weight", Some(v)) => self.weight = v.parse().ok(),
                (other, v) if VALUE_KEYWORDS.contains(&other) => {
                    self.unsupported
                        .push(format!("{other} {}", v.unwrap_or_default()));
                }
                (other, _) => {
                    self.unsupported.push(other.to_string());
                    takes_value = false;
                }
            }
            i += if takes_value { 2 } else { 1 };
        }
    }
}

/// A backend's check directives, in the order haproxy applies them.
#[derive(Clone, Debug, Default)]
struct CheckDirectives {
    /// The last of `option httpchk|ssl-hello-chk|tcp-check|...` wins.
    kind: Option<String>,
    method: Option<String>,
    path: Option<String>,
    connect_ssl: bool,
    connect_port: Option<u16>,
    expect_status: Option<u16>,
    expect_string: Option<String>,
    timeout: Option<Duration>,
    server_defaults: ServerParams,
}

fn read_check_directive(
    file: &str,
    line: &haproxy::Line,
    check: &mut CheckDirectives,
    ledger: &mut Ledger,
) {
    let words: Vec<&str> = line.words.iter().map(String::as_str).collect();
    let used = match words.as_slice() {
        ["option", "httpchk", rest @ ..] => {
            check.kind = Some("httpchk".into());
            match rest {
                [] => {
                    check.method = Some("OPTIONS".into());
                    check.path = Some("/".into());
                }
                [uri] => {
                    check.method = Some("OPTIONS".into());
                    check.path = Some(uri.to_string());
                }
                [method, uri, ..] => {
                    check.method = Some(method.to_string());
                    check.path = Some(uri.to_string());
                }
            }
            true
        }
        [
            "option",
            kind @ ("ssl-hello-chk" | "tcp-check" | "mysql-check" | "pgsql-check" | "redis-check"
            | "smtpchk" | "ldap-check" | "spop-check"),
            ..,
        ] => {
            check.kind = Some(kind.to_string());
            true
        }
        ["http-check", "send", rest @ ..] => {
            for pair in rest.chunks(2) {
                match pair {
                    ["meth", m] => check.method = Some(m.to_string()),
                    ["uri", u] => check.path = Some(u.to_string()),
                    _ => {}
                }
            }
            !rest
                .chunks(2)
                .any(|p| !matches!(p, ["meth", _] | ["uri", _] | ["ver", _]))
        }
        ["http-check", "connect", rest @ ..] => {
            let mut all = true;
            let mut i = 0;
            while i < rest.len() {
                match (rest[i], rest.get(i + 1)) {
                    ("ssl", _) => {
                        check.connect_ssl = true;
                        i += 1;
                    }
                    ("port", Some(p)) => {
                        check.connect_port = p.parse().ok();
                        i += 2;
                    }
                    ("sni", Some(s)) => {
                        check.server_defaults.sni = Some(s.to_string());
                        i += 2;
                    }
                    _ => {
                        all = false;
                        i += 1;
                    }
                }
            }
            all
        }
        ["http-check", "expect", "status", status] => {
            check.expect_status = status.parse().ok();
            check.expect_status.is_some()
        }
        ["http-check", "expect", "string", text] => {
            check.expect_string = Some(text.to_string());
            true
        }
        ["timeout", "check", value] => {
            check.timeout = haproxy::duration(value);
            check.timeout.is_some()
        }
        ["tcp-check", "connect"] => true,
        ["default-server", rest @ ..] => {
            let words: Vec<String> = rest.iter().map(|w| w.to_string()).collect();
            let before = check.server_defaults.unsupported.len();
            check.server_defaults.apply(&words);
            let unsupported: Vec<String> =
                check.server_defaults.unsupported.drain(before..).collect();
            for param in unsupported {
                ledger.note(
                    file,
                    line.number,
                    format!("default-server ... {param}"),
                    server_param_reason(&param),
                );
            }
            true
        }
        _ => false,
    };
    if used {
        ledger.consume(file, line.number);
    }
}

fn server_param_reason(param: &str) -> &'static str {
    match param.split_whitespace().next().unwrap_or("") {
        "send-proxy" | "send-proxy-v2" => {
            "PROXY protocol: ha-lb NATs in the kernel and sends no PROXY header; the backends see the LB's address"
        }
        "maxconn" | "maxqueue" | "minconn" => "connection limits are not enforced by ha-lb",
        "slowstart" => "no slow start: a backend gets its full share as soon as it is up",
        "resolvers" | "resolve-prefer" | "init-addr" => "ha-lb takes IPv4 addresses, not names",
        "cookie" => "HTTP cookies: ha-lb does not parse HTTP",
        "on-marked-down" | "on-marked-up" | "observe" | "on-error" | "error-limit" => {
            "ha-lb marks backends by its checks alone; established flows stay on a backend that goes down"
        }
        _ => "server option not supported by ha-lb",
    }
}

struct Server {
    line: usize,
    name: String,
    address: Ipv4Addr,
    port: Option<u16>,
    params: ServerParams,
}

/// Where a relative ca-file or crt is found (haproxy's ca-base and crt-base).
#[derive(Default)]
struct Bases {
    ca: Option<String>,
    crt: Option<String>,
}

fn resolve(base: &Option<String>, file: &str) -> PathBuf {
    match base {
        Some(base) if !file.starts_with('/') => Path::new(base).join(file),
        _ => PathBuf::from(file),
    }
}

fn translate_haproxy(
    file: &str,
    sections: &[haproxy::Section],
    keepalived_vips: &[Ipv4Addr],
    ledger: &mut Ledger,
) -> Result<Vec<VipConfig>, ImportError> {
    let mut bases = Bases::default();
    for section in sections.iter().filter(|s| s.kind == "global") {
        for line in &section.lines {
            match (line.word(0), line.word(1)) {
                (Some("ca-base"), Some(dir)) => bases.ca = Some(dir.to_string()),
                (Some("crt-base"), Some(dir)) => bases.crt = Some(dir.to_string()),
                _ => continue,
            }
            ledger.consume(file, line.number);
        }
    }
    // Each proxy sees the defaults section last declared before it.
    let mut defaults: Vec<&haproxy::Line> = Vec::new();
    let mut backends: BTreeMap<String, (&haproxy::Section, Vec<&haproxy::Line>)> = BTreeMap::new();
    let mut frontends: Vec<(&haproxy::Section, Vec<&haproxy::Line>)> = Vec::new();
    for section in sections {
        match section.kind.as_str() {
            "defaults" => defaults = section.lines.iter().collect(),
            "backend" => {
                backends.insert(
                    section.name.clone().unwrap_or_default(),
                    (section, defaults.clone()),
                );
            }
            "frontend" => frontends.push((section, defaults.clone())),
            "listen" => {
                frontends.push((section, defaults.clone()));
                backends.insert(
                    section.name.clone().unwrap_or_default(),
                    (section, defaults.clone()),
                );
            }
            _ => {}
        }
    }

    let mut vips = Vec::new();
    for (frontend, frontend_defaults) in &frontends {
        let name = frontend.name.clone().unwrap_or_else(|| "vip".into());
        let mut binds: Vec<(usize, Option<Ipv4Addr>, u16, String)> = Vec::new();
        let mut backend_name = None;
        // Consumed only once the frontend has become a VIP.
        let mut used_lines: Vec<usize> = Vec::new();
        let mut deferred_notes: Vec<(&haproxy::Line, &str)> = Vec::new();
        let mut mode = frontend_defaults
            .iter()
            .rev()
            .find(|l| l.word(0) == Some("mode"))
            .and_then(|l| l.word(1))
            .unwrap_or("tcp")
            .to_string();
        for line in &frontend.lines {
            match (line.word(0), line.word(1)) {
                (Some("bind"), Some(spec)) => {
                    for one in spec.split(',') {
                        let Some((host, port)) = one.rsplit_once(':') else {
                            continue;
                        };
                        let Ok(port) = port.parse::<u16>() else {
                            continue;
                        };
                        let address = match host {
                            "" | "*" | "0.0.0.0" | "::" | "[::]" | "ipv4@" | "ipv4@*" => None,
                            host => match host.trim_start_matches("ipv4@").parse() {
                                Ok(a) => Some(a),
                                Err(_) => continue,
                            },
                        };
                        binds.push((line.number, address, port, spec.to_string()));
                    }
                    if line.words.len() > 2 {
                        deferred_notes.push((
                            line,
                            "bind options (TLS, interface, v4v6, ...) are not carried over: ha-lb forwards TCP as it is",
                        ));
                    } else {
                        used_lines.push(line.number);
                    }
                }
                (Some("default_backend"), Some(b)) => {
                    backend_name = Some(b.to_string());
                    used_lines.push(line.number);
                }
                (Some("mode"), Some(m)) => {
                    mode = m.to_string();
                    if m == "tcp" {
                        used_lines.push(line.number);
                    }
                }
                _ => {}
            }
        }
        if frontend.kind == "listen" {
            backend_name = frontend.name.clone();
        }
        let Some((backend, backend_defaults)) = backend_name.and_then(|b| backends.get(&b)) else {
            continue;
        };
        if binds.is_empty() {
            continue;
        }
        if mode == "http" {
            ledger.note(
                file,
                frontend.header.number,
                frontend.header.text(),
                "mode http: ha-lb balances the TCP connections; HTTP routing, headers and logs are not carried over",
            );
        }
        let Some((check, backends_of_vip)) =
            translate_backend(file, backend, backend_defaults, &bases, ledger)
        else {
            continue;
        };
        let mut addresses: Vec<(Ipv4Addr, u16)> = Vec::new();
        for (line, address, port, spec) in &binds {
            match address {
                Some(address) => addresses.push((*address, *port)),
                None if keepalived_vips.is_empty() => {
                    return Err(ImportError::NoVipAddress {
                        at: format!("{file}:{line}"),
                        frontend: name.clone(),
                        bind: spec.clone(),
                    });
                }
                None => addresses.extend(keepalived_vips.iter().map(|a| (*a, *port))),
            }
        }
        addresses.dedup();
        for line in used_lines {
            ledger.consume(file, line);
        }
        for (line, why) in deferred_notes {
            ledger.note(file, line.number, line.text(), why);
        }
        let several = addresses.len() > 1;
        for (i, (address, port)) in addresses.into_iter().enumerate() {
            vips.push(VipConfig {
                name: if several {
                    format!("{}-{}", vip_name(&name), i + 1)
                } else {
                    vip_name(&name)
                },
                address,
                port,
                protocol: Protocol::Tcp,
                mode: Mode::Nat,
                check: check.clone(),
                backends: backends_of_vip.clone(),
            });
        }
    }
    Ok(vips)
}

/// haproxy names allow `.` and `:`; ha-lb's VIP names are letters, digits, `-`, `_`.
fn vip_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn translate_backend(
    file: &str,
    backend: &haproxy::Section,
    defaults: &[&haproxy::Line],
    bases: &Bases,
    ledger: &mut Ledger,
) -> Option<(CheckConfig, Vec<BackendConfig>)> {
    let mut directives = CheckDirectives::default();
    for line in defaults.iter().copied().chain(&backend.lines) {
        read_check_directive(file, line, &mut directives, ledger);
        if line.word(0) == Some("mode") && line.word(1) == Some("tcp") {
            ledger.consume(file, line.number);
        }
    }
    let mut servers = Vec::new();
    for line in backend.lines.iter().filter(|l| l.word(0) == Some("server")) {
        let (Some(name), Some(spec)) = (line.word(1), line.word(2)) else {
            continue;
        };
        let (host, port) = match spec.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()),
            None => (spec, None),
        };
        let Ok(address) = host.parse::<Ipv4Addr>() else {
            ledger.note(
                file,
                line.number,
                line.text(),
                "ha-lb takes IPv4 addresses, not names: write the server's address",
            );
            continue;
        };
        let mut params = directives.server_defaults.clone();
        params.apply(&line.words[3..]);
        ledger.consume(file, line.number);
        for param in &params.unsupported {
            ledger.note(
                file,
                line.number,
                format!("server {name} ... {param}"),
                server_param_reason(param),
            );
        }
        if params.backup {
            ledger.note(
                file,
                line.number,
                line.text(),
                "backup servers are not supported: ha-lb fails open to all backends instead; not carried over",
            );
            continue;
        }
        if params.disabled {
            ledger.note(
                file,
                line.number,
                line.text(),
                "imported as a normal backend: drain it after start with `ha-user drain`",
            );
        }
        servers.push(Server {
            line: line.number,
            name: name.to_string(),
            address,
            port,
            params,
        });
    }
    let first = servers
        .iter()
        .find(|s| s.params.check)
        .or(servers.first())?;
    let p = &first.params;
    let tls = directives.connect_ssl || p.check_ssl || p.ssl;
    let mut check = CheckConfig::default();
    let kind = match directives.kind.as_deref() {
        Some("httpchk") if tls => CheckKind::Https,
        Some("httpchk") => CheckKind::Http,
        _ => CheckKind::Tcp,
    };
    check.kind = Some(kind);
    let header = (backend.header.number, backend.header.text());
    match directives.kind.as_deref() {
        Some("ssl-hello-chk") => ledger.note(
            file,
            header.0,
            header.1.clone(),
            "option ssl-hello-chk: ha-lb has no TLS-hello-only check and uses a TCP connect; `type: https` with `path: /readyz` checks a kube-apiserver properly",
        ),
        Some(other) if other != "httpchk" && other != "tcp-check" => ledger.note(
            file,
            header.0,
            header.1.clone(),
            "this protocol check is not supported: ha-lb uses a TCP connect",
        ),
        _ => {}
    }
    if !servers.iter().any(|s| s.params.check) {
        ledger.note(
            file,
            header.0,
            header.1.clone(),
            "no server has `check`, so haproxy never checks them; ha-lb checks every backend",
        );
    }
    if kind != CheckKind::Tcp {
        check.path = directives.path.clone().unwrap_or_else(|| "/".into());
        if let Some(method) = directives.method.as_deref().filter(|m| *m != "GET") {
            ledger.note(
                file,
                header.0,
                header.1.clone(),
                match method {
                    "OPTIONS" => {
                        "`option httpchk` without a method sends OPTIONS; ha-lb checks with GET"
                    }
                    _ => "ha-lb checks with GET",
                },
            );
        }
        match (&directives.expect_status, &directives.expect_string) {
            (Some(status), _) => check.expect_status = *status,
            (None, Some(_)) => {}
            (None, None) => ledger.note(
                file,
                header.0,
                header.1.clone(),
                "without `http-check expect` haproxy accepts any 2xx or 3xx; ha-lb expects status 200",
            ),
        }
        check.expect_body = directives.expect_string.clone();
        if directives.expect_string.is_some() && directives.expect_status.is_none() {
            ledger.note(
                file,
                header.0,
                header.1.clone(),
                "`http-check expect string` checks the body only; ha-lb also expects status 200",
            );
        }
    }
    if kind == CheckKind::Https {
        check.verify = match (&p.verify, &p.ca_file) {
            (Some(v), _) if v == "none" => Verify::None,
            (_, Some(ca)) => Verify::CaFile(resolve(&bases.ca, ca)),
            _ => Verify::None,
        };
        check.client_cert = p.crt.as_ref().map(|c| resolve(&bases.crt, c));
        check.client_key = check.client_cert.clone();
        check.sni = p.sni.clone();
    }
    check.port = directives.connect_port.or(p.port);
    let inter = p.inter.unwrap_or(Duration::from_secs(2));
    check.interval = inter;
    check.fast_interval = p.fastinter.unwrap_or(inter);
    check.down_interval = p.downinter;
    check.rise = p.rise.unwrap_or(2);
    check.fall = p.fall.unwrap_or(3);
    // haproxy reads a check's answer for `timeout check`, or for `inter` without it.
    check.timeout = directives.timeout.unwrap_or(inter);

    for server in &servers {
        if server.params.check_settings() != first.params.check_settings() {
            ledger.note(
                file,
                server.line,
                format!("server {}", server.name),
                "its check settings differ from the first server's; ha-lb checks every backend of a VIP alike and uses the first server's",
            );
        }
    }
    let backends = servers
        .iter()
        .map(|s| BackendConfig {
            address: s.address,
            port: s.port,
            weight: s.params.weight.unwrap_or(1),
        })
        .collect();
    Some((check, backends))
}

// --- output ------------------------------------------------------------------

/// The imported config as YAML, with the notes as a comment block above it.
pub fn render(imported: &Imported, sources: &[&str]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# ha-lb config imported by `ha-user import` from {}.",
        sources.join(" and ")
    );
    let iface = imported.interface.as_deref().unwrap_or("<interface>");
    let _ = writeln!(
        out,
        "# Check it with `ha-user check-config --config FILE`; run it with\n# `ha-user attach --iface {iface} --config FILE`."
    );
    if imported.config.vrrp.is_none() {
        let _ = writeln!(
            out,
            "# No keepalived.conf: this host owns the VIPs statically (no vrrp section)."
        );
    }
    if imported.notes.is_empty() {
        let _ = writeln!(out, "#\n# Every directive was carried over.");
    } else {
        let _ = writeln!(
            out,
            "#\n# Not carried over, or carried over with a change ({}):",
            imported.notes.len()
        );
        for note in &imported.notes {
            let _ = writeln!(out, "#   {}  `{}`: {}", note.at(), note.directive, note.why);
        }
    }
    out.push('\n');
    let mut value = serde_yaml_ng::to_value(&imported.config).expect("a Config always serializes");
    if let Some(map) = value.as_mapping_mut() {
        // Defaults of ha-lb's own: left out so the file shows what was imported.
        map.remove("data_plane");
        map.remove("telemetry");
        if imported.config.garp == GarpConfig::default() {
            map.remove("garp");
        }
        // A TCP check has no path, status or certificate to show.
        let vips = map.get_mut("vips").and_then(|v| v.as_sequence_mut());
        for vip in vips.into_iter().flatten() {
            let Some(check) = vip.get_mut("check").and_then(|c| c.as_mapping_mut()) else {
                continue;
            };
            if check.get("type").and_then(|t| t.as_str()) == Some("tcp") {
                for key in ["path", "expect_status", "verify"] {
                    check.remove(key);
                }
            }
        }
    }
    out.push_str(&serde_yaml_ng::to_string(&value).expect("a Value always serializes"));
    out
}

#[cfg(test)]
mod tests;
