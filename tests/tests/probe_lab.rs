//! Every kind and option of the health check against a real stand-in
//! apiserver, from another lab host: TLS verification against a CA file,
//! SNI, client certificates (as etcd requires), plain HTTP with status and
//! body expectations, TCP, and the deadline.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ha_lab::{Lab, LabProcess};
use ha_user::{
    config::{CheckConfig, CheckKind, Verify},
    health::CheckResult,
    probe::{Outcome, Prober},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA and a client certificate it signed, written as PEM files.
fn client_pki(lab: &Lab) -> Pki {
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["ha-lb-check".to_string()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    let dir = lab.log_dir();
    let pki = Pki {
        ca: dir.join("client-ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.client_cert, client.pem()).unwrap();
    std::fs::write(&pki.client_key, client_key.serialize_pem()).unwrap();
    pki
}

fn standin(lab: &Lab, extra: &[&str]) -> (LabProcess, PathBuf) {
    let cert = lab.log_dir().join(format!("server-{}.pem", extra.len()));
    let mut args = vec!["--cert-out", cert.to_str().unwrap()];
    args.extend_from_slice(extra);
    (lab.start_standin("api1", &args).unwrap(), cert)
}

fn check(kind: CheckKind) -> CheckConfig {
    CheckConfig {
        kind: Some(kind),
        timeout: Duration::from_millis(500),
        ..CheckConfig::default()
    }
}

fn run(lab: &Lab, config: &CheckConfig, port: u16) -> Outcome {
    let target = SocketAddr::from((lab.host("api1").addr, port));
    let prober = Prober::new(config).expect("a valid check");
    lab.in_host("client", || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(prober.check(target))
    })
    .unwrap()
}

fn assert_outcome(outcome: &Outcome, result: CheckResult, detail: &str) {
    assert_eq!(outcome.result, result, "{outcome:?}");
    assert!(
        outcome.detail.contains(detail),
        "expected {detail:?} in {outcome:?}"
    );
}

#[test]
fn https_verifies_against_a_ca_file_and_the_server_name() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let (_server, cert) = standin(&lab, &[]);
    let mut https = check(CheckKind::Https);
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Pass, "status 200");
    https.verify = Verify::CaFile(cert.clone());
    // The backend's IP is in the certificate's names.
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Pass, "status 200");
    https.sni = Some("api1".to_string());
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Pass, "status 200");
    https.sni = Some("etcd.example".to_string());
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Fail, "TLS");
    // A CA that did not sign the server's certificate.
    https.sni = None;
    https.verify = Verify::CaFile(client_pki(&lab).ca);
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Fail, "TLS");
}

#[test]
fn a_client_certificate_is_presented_when_the_backend_requires_one() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let pki = client_pki(&lab);
    let (_server, _) = standin(&lab, &["--client-ca", pki.ca.to_str().unwrap()]);
    let mut https = check(CheckKind::Https);
    https.path = "/healthz".to_string();
    let refused = run(&lab, &https, 6443);
    assert_eq!(
        refused.result,
        CheckResult::Fail,
        "no client certificate: {refused:?}"
    );
    https.client_cert = Some(pki.client_cert.clone());
    https.client_key = Some(pki.client_key.clone());
    assert_outcome(&run(&lab, &https, 6443), CheckResult::Pass, "status 200");
}

#[test]
fn http_checks_status_and_body() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let (server, _) = standin(&lab, &[]);
    let mut http = check(CheckKind::Http);
    assert_outcome(&run(&lab, &http, 6443), CheckResult::Pass, "status 200");
    http.expect_body = Some("ok".to_string());
    assert_outcome(&run(&lab, &http, 6443), CheckResult::Pass, "status 200");
    http.expect_body = Some("ready".to_string());
    assert_outcome(
        &run(&lab, &http, 6443),
        CheckResult::NotReady,
        "body lacks \"ready\"",
    );
    http.expect_body = None;
    http.path = "/nope".to_string();
    assert_outcome(&run(&lab, &http, 6443), CheckResult::NotReady, "status 404");
    http.path = "/readyz".to_string();
    server.signal(nix::sys::signal::Signal::SIGUSR1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_outcome(&run(&lab, &http, 6443), CheckResult::NotReady, "status 500");
    http.path = "/livez".to_string();
    assert_outcome(&run(&lab, &http, 6443), CheckResult::Pass, "status 200");
}

#[test]
fn tcp_connects_and_a_closed_port_is_refused() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let (_server, _) = standin(&lab, &[]);
    let tcp = check(CheckKind::Tcp);
    assert_outcome(&run(&lab, &tcp, 6443), CheckResult::Pass, "connected");
    assert_outcome(
        &run(&lab, &tcp, 6444),
        CheckResult::Fail,
        "connection refused",
    );
    // `port` overrides the backend's port.
    let other = CheckConfig {
        port: Some(6443),
        ..check(CheckKind::Tcp)
    };
    assert_outcome(&run(&lab, &other, 1), CheckResult::Pass, "connected");
}

#[test]
fn a_hung_backend_fails_at_the_deadline() {
    let lab = Lab::new(&["client", "api1"]).unwrap();
    let (_server, _) = standin(&lab, &["--hang"]);
    let outcome = run(&lab, &check(CheckKind::Https), 6443);
    assert_outcome(&outcome, CheckResult::Fail, "timed out after 500ms");
    assert!(
        outcome.latency >= Duration::from_millis(500)
            && outcome.latency < Duration::from_millis(800),
        "{outcome:?}"
    );
}
