//! haproxy.cfg's sections as the config's VIPs, their backends and checks.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Line, Section,
    directives::{CheckDirectives, ServerParams, read_check_directive, server_param_reason},
};
use crate::{
    config::{BackendConfig, CheckConfig, CheckKind, Mode, Protocol, Verify, VipConfig},
    import::{ImportError, ledger::Ledger},
};

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

/// The VIPs of haproxy.cfg: one per address a frontend (or listen section)
/// binds whose backend has servers with IPv4 addresses; a wildcard bind
/// takes keepalived's virtual addresses.
pub(crate) fn translate(
    file: &str,
    sections: &[Section],
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
    let mut defaults: Vec<&Line> = Vec::new();
    let mut backends: BTreeMap<String, (&Section, Vec<&Line>)> = BTreeMap::new();
    let mut frontends: Vec<(&Section, Vec<&Line>)> = Vec::new();
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
        let mut deferred_notes: Vec<(&Line, &str)> = Vec::new();
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
                            host => match parse_address(host) {
                                Some(IpAddr::V4(a)) => Some(a),
                                Some(IpAddr::V6(_)) => {
                                    ledger.note(
                                        file,
                                        line.number,
                                        format!("bind {one}"),
                                        IPV6_BIND,
                                    );
                                    continue;
                                }
                                None => continue,
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
                address: address.into(),
                port,
                protocol: Protocol::Tcp,
                mode: Mode::Nat,
                check: check.clone(),
                on_marked_down: Default::default(),
                backends: backends_of_vip.clone(),
            });
        }
    }
    Ok(vips)
}

/// What a user reads about an IPv6 bind or server (validation says the same of the config).
const IPV6_BIND: &str = "IPv6 bind: ha-lb serves IPv4 VIPs only for now; not carried over";
const IPV6_SERVER: &str = "IPv6 server: ha-lb serves IPv4 backends only for now; not carried over";

/// The address of a bind or server, as haproxy writes it: `10.0.0.1`,
/// `ipv4@10.0.0.1`, `[2001:db8::1]`, `ipv6@2001:db8::1`, `2001:db8::1` (the
/// port already split off); `None` for a name.
fn parse_address(host: &str) -> Option<IpAddr> {
    let host = host
        .strip_prefix("ipv4@")
        .or_else(|| host.strip_prefix("ipv6@"))
        .unwrap_or(host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
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
    backend: &Section,
    defaults: &[&Line],
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
        let address = match parse_address(host) {
            Some(IpAddr::V4(address)) => address,
            Some(IpAddr::V6(_)) => {
                ledger.note(file, line.number, line.text(), IPV6_SERVER);
                continue;
            }
            None => {
                ledger.note(
                    file,
                    line.number,
                    line.text(),
                    "ha-lb takes IPv4 addresses, not names: write the server's address",
                );
                continue;
            }
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
            address: s.address.into(),
            port: s.port,
            weight: s.params.weight.unwrap_or(1),
        })
        .collect();
    Some((check, backends))
}

/// Lists every line the translation did not consume, with the reason.
pub(crate) fn note_unconsumed(file: &str, sections: &[Section], ledger: &mut Ledger) {
    for section in sections {
        for line in &section.lines {
            if !ledger.is_consumed(file, line.number) {
                let why = reason(section, line);
                ledger.note(file, line.number, line.text(), why);
            }
        }
    }
}

fn reason(section: &Section, line: &Line) -> &'static str {
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
