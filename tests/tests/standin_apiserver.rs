//! The stand-in kube-apiserver, exercised over the lab with real HTTPS (curl)
//! and real TCP.

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    time::Duration,
};

use ha_lab::{Lab, LabProcess};
use nix::sys::signal::Signal;

struct Fixture {
    lab: Lab,
    server: LabProcess,
    cert: std::path::PathBuf,
    not_ready: std::path::PathBuf,
}

fn start() -> Fixture {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let cert = lab.log_dir().join("api1.pem");
    let not_ready = lab.log_dir().join("api1.not-ready");
    let server = lab
        .start_standin(
            "api1",
            &[
                "--cert-out",
                cert.to_str().unwrap(),
                "--not-ready-file",
                not_ready.to_str().unwrap(),
            ],
        )
        .unwrap();
    Fixture {
        lab,
        server,
        cert,
        not_ready,
    }
}

/// (status code, body) of an HTTPS GET from the client host, verifying the
/// server's certificate against the one it wrote.
fn get(f: &Fixture, path: &str) -> (u16, String) {
    let url = format!("https://{}:6443{path}", f.lab.host("api1").addr);
    let out = f
        .lab
        .exec(
            "client",
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--cacert",
                f.cert.to_str().unwrap(),
                "-w",
                "\n%{http_code}",
                &url,
            ],
        )
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn health_endpoints_answer_ok_over_verified_tls() {
    let f = start();
    for path in ["/livez", "/readyz", "/healthz"] {
        assert_eq!(get(&f, path), (200, "ok".to_string()), "{path}");
    }
    assert_eq!(get(&f, "/nope").0, 404);
}

#[test]
fn whoami_reports_server_name_and_client_address() {
    let f = start();
    let (code, body) = get(&f, "/whoami");
    assert_eq!(code, 200);
    let client = f.lab.host("client").addr;
    assert!(
        body.starts_with(&format!("server=api1 client={client}:")),
        "{body}"
    );
}

#[test]
fn readyz_fails_while_not_ready_and_other_paths_keep_serving() {
    let mut f = start();
    f.server.signal(Signal::SIGUSR1).unwrap();
    f.server
        .wait_for_log("not ready", Duration::from_secs(5))
        .unwrap();
    let (code, body) = get(&f, "/readyz");
    assert_eq!(code, 500);
    assert!(body.contains("readyz check failed"), "{body}");
    assert_eq!(get(&f, "/livez").0, 200);
    assert_eq!(get(&f, "/healthz").0, 200);
    f.server.signal(Signal::SIGUSR2).unwrap();
    f.server
        .wait_for_log("ready (SIGUSR2)", Duration::from_secs(5))
        .unwrap();
    assert_eq!(get(&f, "/readyz").0, 200);

    // The control file does the same without signals.
    std::fs::write(&f.not_ready, "").unwrap();
    assert_eq!(get(&f, "/readyz").0, 500);
    std::fs::remove_file(&f.not_ready).unwrap();
    assert_eq!(get(&f, "/readyz").0, 200);
}

#[test]
fn sigterm_fails_readyz_then_exits_after_the_shutdown_delay() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let listen = format!("{}:6443", lab.host("api1").addr);
    let mut server = lab
        .start_standin("api1", &["--shutdown-delay", "1s"])
        .unwrap();
    server.signal(Signal::SIGTERM).unwrap();
    server
        .wait_for_log("readyz failing", Duration::from_secs(5))
        .unwrap();
    let url = format!("https://{listen}/readyz");
    let out = lab
        .exec(
            "client",
            &["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", &url],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "500");
    let status = server
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("exits after the delay");
    assert!(status.success());
}

#[test]
fn line_mode_answers_whoami_and_echoes_a_long_lived_connection() {
    let f = start();
    let api1 = f.lab.host("api1").addr;
    let client = f.lab.host("client").addr;
    f.lab
        .in_host("client", || {
            let stream = TcpStream::connect((api1, 6443)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            writer.write_all(b"whoami\n").unwrap();
            reader.read_line(&mut line).unwrap();
            assert!(line.starts_with(&format!("api1 {client}:")), "{line}");
            for i in 0..20 {
                line.clear();
                writer
                    .write_all(format!("message {i}\n").as_bytes())
                    .unwrap();
                reader.read_line(&mut line).unwrap();
                assert_eq!(line, format!("message {i}\n"));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .unwrap();
}
