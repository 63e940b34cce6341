//! What haproxy's check directives and `server` / `default-server` options
//! say, gathered before a backend is translated.

use std::time::Duration;

use super::{Line, duration};
use crate::import::ledger::Ledger;

/// What a `server` or `default-server` line says.
#[derive(Clone, Debug, Default)]
pub(super) struct ServerParams {
    pub(super) check: bool,
    pub(super) ssl: bool,
    pub(super) check_ssl: bool,
    pub(super) verify: Option<String>,
    pub(super) ca_file: Option<String>,
    pub(super) crt: Option<String>,
    pub(super) sni: Option<String>,
    pub(super) port: Option<u16>,
    pub(super) inter: Option<Duration>,
    pub(super) fastinter: Option<Duration>,
    pub(super) downinter: Option<Duration>,
    pub(super) rise: Option<u32>,
    pub(super) fall: Option<u32>,
    pub(super) weight: Option<u32>,
    pub(super) backup: bool,
    pub(super) disabled: bool,
    pub(super) unsupported: Vec<String>,
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
pub(super) type CheckSettings<'a> = (
    [Option<Duration>; 3],
    [Option<u32>; 2],
    Option<u16>,
    [&'a Option<String>; 4],
    bool,
);

impl ServerParams {
    pub(super) fn check_settings(&self) -> CheckSettings<'_> {
        (
            [self.inter, self.fastinter, self.downinter],
            [self.rise, self.fall],
            self.port,
            [&self.verify, &self.ca_file, &self.crt, &self.sni],
            self.check_ssl || self.ssl,
        )
    }

    pub(super) fn apply(&mut self, words: &[String]) {
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
                ("inter", Some(v)) => self.inter = duration(v),
                ("fastinter", Some(v)) => self.fastinter = duration(v),
                ("downinter", Some(v)) => self.downinter = duration(v),
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
pub(super) struct CheckDirectives {
    /// The last of `option httpchk|ssl-hello-chk|tcp-check|...` wins.
    pub(super) kind: Option<String>,
    pub(super) method: Option<String>,
    pub(super) path: Option<String>,
    pub(super) connect_ssl: bool,
    pub(super) connect_port: Option<u16>,
    pub(super) expect_status: Option<u16>,
    pub(super) expect_string: Option<String>,
    pub(super) timeout: Option<Duration>,
    pub(super) server_defaults: ServerParams,
}

pub(super) fn read_check_directive(
    file: &str,
    line: &Line,
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
            check.timeout = duration(value);
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

pub(super) fn server_param_reason(param: &str) -> &'static str {
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
