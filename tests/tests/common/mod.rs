//! Helpers shared by the lab test suites: stand-in apiservers, agent configs, clients.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use ha_lab::{
    HOST_IFACE, Lab, LabProcess,
    config::{self, VipExt},
};
use ha_user::config::{Config, VipConfig};

pub fn start_apiservers(lab: &Lab, names: &[&str]) -> Vec<LabProcess> {
    names
        .iter()
        .map(|name| lab.start_standin(name, &[]).unwrap())
        .collect()
}

/// The TCP VIP `apiserver` on the lab's first VIP address, port 6443, in
/// front of the hosts `backends`.
pub fn apiserver_vip(lab: &Lab, backends: &[&str]) -> VipConfig {
    config::vip("apiserver", lab.vip(0), 6443).backends(&config::addresses(lab, backends))
}

/// A config with one TCP VIP on 6443 in front of `backends`: [`apiserver_vip`].
pub fn vip_config(lab: &Lab, backends: &[&str]) -> Config {
    config::agent([apiserver_vip(lab, backends)])
}

/// Writes the config as YAML into the lab's log directory: its path.
pub fn write_config(lab: &Lab, name: &str, config: &Config) -> PathBuf {
    config::write(lab, name, config)
}

/// Writes `text` as it is into the lab's log directory: its path.
pub fn write_file(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let path = lab.log_dir().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

pub fn start_agent(lab: &Lab, host: &str, config: &Path, extra: &[&str]) -> LabProcess {
    lab.start_agent(host, config, extra).unwrap()
}

/// One line-protocol exchange through a fresh connection: `(server name, client address it saw)`.
pub fn whoami(to: Ipv4Addr, port: u16) -> std::io::Result<(String, String)> {
    whoami_within(to, port, Duration::from_secs(2))
}

/// [`whoami`], with `connect` time to connect.
pub fn whoami_within(
    to: Ipv4Addr,
    port: u16,
    connect: Duration,
) -> std::io::Result<(String, String)> {
    let stream = TcpStream::connect_timeout(&SocketAddr::from((to, port)), connect)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(b"whoami\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(name), Some(client)) => Ok((name.to_string(), client.to_string())),
        _ => Err(std::io::Error::other(format!("unexpected reply {line:?}"))),
    }
}

/// The `ip` state an agent must leave as it found it: addresses, XDP
/// attachment, managed neighbours, the forwarding sysctl.
pub fn host_state(lab: &Lab, host: &str) -> String {
    let addresses = lab
        .exec(host, &["ip", "-o", "addr", "show"])
        .unwrap()
        .stdout;
    let link = lab
        .exec(host, &["ip", "-d", "link", "show", HOST_IFACE])
        .unwrap()
        .stdout;
    let neigh = lab.exec(host, &["ip", "neigh", "show"]).unwrap().stdout;
    let managed: Vec<String> = String::from_utf8_lossy(&neigh)
        .lines()
        .filter(|l| l.contains("managed"))
        .map(str::to_string)
        .collect();
    let forwarding = lab
        .exec(host, &["cat", "/proc/sys/net/ipv4/conf/eth0/forwarding"])
        .unwrap()
        .stdout;
    let xdp = String::from_utf8_lossy(&link).contains("prog/xdp");
    // Duplicate address detection of the link-local address may still run
    // in a fresh lab: not the agent's doing.
    let addresses = String::from_utf8_lossy(&addresses).replace(" tentative", "");
    format!(
        "addresses:\n{addresses}\nxdp attached: {xdp}\nmanaged neighbours:\n{}\nforwarding: {}",
        managed.join("\n"),
        String::from_utf8_lossy(&forwarding)
    )
}

/// A long-lived line-protocol connection through the VIP.
pub struct Session {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Session {
    pub fn open(vip: Ipv4Addr) -> Session {
        Session::open_port(vip, 6443)
    }

    /// [`Session::open`] to `vip:port`.
    pub fn open_port(vip: Ipv4Addr, port: u16) -> Session {
        let stream = TcpStream::connect((vip, port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Session {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// A connection that landed on the backend named `wanted`.
    pub fn to(vip: Ipv4Addr, wanted: &str) -> Session {
        Session::to_port(vip, 6443, wanted)
    }

    /// [`Session::to`] through `vip:port`.
    pub fn to_port(vip: Ipv4Addr, port: u16, wanted: &str) -> Session {
        for _ in 0..200 {
            let mut session = Session::open_port(vip, port);
            if session.exchange("whoami").starts_with(wanted) {
                return session;
            }
        }
        panic!("no connection landed on {wanted}");
    }

    pub fn exchange(&mut self, text: &str) -> String {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    pub fn assert_alive(&mut self, rounds: usize) {
        for i in 0..rounds {
            assert_eq!(
                self.exchange(&format!("ping {i}")),
                format!("ping {i}\n"),
                "the long-lived connection broke"
            );
        }
    }
}

/// GET on the agent's telemetry endpoint (default 127.0.0.1:9641) from
/// inside `host`, as a kubelet probe or a Prometheus scrape would: (status, body).
pub fn telemetry(lab: &Lab, host: &str, path: &str) -> (u16, String) {
    let out = lab
        .exec(
            host,
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:9641{path}"),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `ha-user status --json` on `host`, as an operator would run it there.
pub fn status_json(lab: &Lab, host: &str) -> serde_json::Value {
    let out = lab
        .exec(
            host,
            &[
                ha_lab::bin_path("ha-user").to_str().unwrap(),
                "status",
                "--json",
            ],
        )
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ha-user reload` on `host`: `Ok(stdout)` when it exits 0, `Err(stderr)` otherwise.
pub fn reload(lab: &Lab, host: &str) -> Result<String, String> {
    let out = lab
        .command(host, ha_lab::bin_path("ha-user"))
        .arg("reload")
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// A keep-alive HTTP/1.1 connection (plain HTTP, as the stand-in serves it
/// besides HTTPS) through the VIP: one TCP connection, many requests.
pub struct HttpSession {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl HttpSession {
    pub fn open(to: Ipv4Addr, port: u16) -> std::io::Result<HttpSession> {
        let stream =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(HttpSession {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// `GET path` on this connection: (status, body). The connection stays open.
    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::Read;
        self.writer
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: apiserver\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("connection closed"));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0;
        loop {
            let mut header = String::new();
            if self.reader.read_line(&mut header)? == 0 {
                return Err(std::io::Error::other("connection closed in the headers"));
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().map_err(std::io::Error::other)?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET /whoami`: the server's name and the client address it saw.
    pub fn whoami(&mut self) -> std::io::Result<(String, std::net::SocketAddrV4)> {
        let (status, body) = self.get("/whoami")?;
        let parsed = (|| {
            let mut server = None;
            let mut client = None;
            for field in body.split_whitespace() {
                if let Some(v) = field.strip_prefix("server=") {
                    server = Some(v.to_string());
                } else if let Some(v) = field.strip_prefix("client=") {
                    client = v.parse().ok();
                }
            }
            Some((server?, client?))
        })();
        match parsed {
            Some(answer) if status == 200 => Ok(answer),
            _ => Err(std::io::Error::other(format!(
                "unexpected answer {status} {body:?}"
            ))),
        }
    }
}

/// Bytes of `/big` on the file servers.
pub const DOWNLOAD: usize = 2 * 1024 * 1024;

/// nginx on `host`:8080 serving `/big`, `DOWNLOAD` bytes.
pub fn start_file_server(lab: &Lab, host: &str) -> LabProcess {
    let www = lab.log_dir().join(format!("nginx-{host}")).join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("big"), vec![b'x'; DOWNLOAD]).unwrap();
    ha_lab::nginx::start_server(lab, host, 8080, 64, |dir| {
        format!("; root {}/www;", dir.display())
    })
    .unwrap()
}

/// nginx on every one of `backends` serving `/big`, and an agent on `lb`
/// with one VIP on port 8080 in front of them.
pub fn start_file_vip(lab: &Lab, backends: &[&str]) -> (Vec<LabProcess>, LabProcess) {
    let servers = backends.iter().map(|b| start_file_server(lab, b)).collect();
    let files = config::vip("files", lab.vip(0), 8080).backends(&config::addresses(lab, backends));
    let config = write_config(lab, "config.yaml", &config::agent([files]));
    let agent = start_agent(lab, "lb", &config, &[]);
    (servers, agent)
}

/// Downloads `/big` from the file VIP on `host` with curl: the bytes it got,
/// or why it failed.
pub fn download(lab: &Lab, host: &str) -> String {
    let url = format!("http://{}:8080/big", lab.vip(0));
    lab.exec(
        host,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "20",
            "-w",
            "%{size_download}",
            &url,
        ],
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_else(|e| format!("failed: {e}"))
}
