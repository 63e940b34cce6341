//! One health check of one backend: a TCP connect, or an HTTP(S) GET with
//! an expected status and optional body substring (hyper over rustls).
//!
//! Every check runs under one deadline (`timeout`), connect to last byte, so
//! a backend that accepts and never answers fails in bounded time; and each
//! backend has its own task, so it never delays another's checks.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use crate::{
    config::{CheckConfig, CheckKind, Verify},
    health::CheckResult,
};

/// A body longer than this is cut (only a substring is looked for).
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProbeSetupError {
    #[error("reading {path}: {message}")]
    Pem { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// What one check found, for the state machine and for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub result: CheckResult,
    #[serde(serialize_with = "serialize_millis")]
    pub latency: Duration,
    /// `200`, `status 500`, `connection refused`, `timed out after 1s`, ...
    pub detail: String,
}

fn serialize_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// A check, ready to run against any backend of its VIP.
pub struct Prober {
    kind: CheckKind,
    port: Option<u16>,
    path: String,
    expect_status: u16,
    expect_body: Option<String>,
    timeout: Duration,
    tls: Option<TlsConnector>,
    sni: Option<String>,
}

impl Prober {
    pub fn new(check: &CheckConfig) -> Result<Self, ProbeSetupError> {
        let tls = match check.kind() {
            CheckKind::Https => Some(TlsConnector::from(Arc::new(tls_config(check)?))),
            CheckKind::Tcp | CheckKind::Http => None,
        };
        if let Some(name) = &check.sni {
            ServerName::try_from(name.clone())
                .map_err(|_| ProbeSetupError::ServerName(name.clone()))?;
        }
        Ok(Self {
            kind: check.kind(),
            port: check.port,
            path: check.path.clone(),
            expect_status: check.expect_status,
            expect_body: check.expect_body.clone(),
            timeout: check.timeout,
            tls,
            sni: check.sni.clone(),
        })
    }

    /// Checks `backend` (its address and port; `check.port` overrides the port).
    pub async fn check(&self, backend: SocketAddr) -> Outcome {
        let target = SocketAddr::new(backend.ip(), self.port.unwrap_or(backend.port()));
        let started = Instant::now();
        let (result, detail) = match tokio::time::timeout(self.timeout, self.run(target)).await {
            Ok(found) => found,
            Err(_) => (
                CheckResult::Fail,
                format!(
                    "timed out after {}",
                    humantime::format_duration(self.timeout)
                ),
            ),
        };
        Outcome {
            result,
            latency: started.elapsed(),
            detail,
        }
    }

    async fn run(&self, target: SocketAddr) -> (CheckResult, String) {
        let stream = match TcpStream::connect(target).await {
            Ok(stream) => stream,
            Err(e) => return (CheckResult::Fail, connect_error(&e)),
        };
        let _ = stream.set_nodelay(true);
        match (&self.kind, &self.tls) {
            (CheckKind::Tcp, _) => (CheckResult::Pass, "connected".to_string()),
            (CheckKind::Https, Some(tls)) => {
                let name = match &self.sni {
                    Some(name) => ServerName::try_from(name.clone()).expect("checked in new()"),
                    None => ServerName::IpAddress(target.ip().into()),
                };
                match tls.connect(name, stream).await {
                    Ok(tls_stream) => self.http_get(tls_stream, target).await,
                    Err(e) => (CheckResult::Fail, format!("TLS: {e}")),
                }
            }
            _ => self.http_get(stream, target).await,
        }
    }

    async fn http_get<S>(&self, stream: S, target: SocketAddr) -> (CheckResult, String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(e) => return (CheckResult::Fail, format!("HTTP: {e}")),
            };
        tokio::spawn(connection);
        let host = self.sni.clone().unwrap_or_else(|| target.ip().to_string());
        let request = Request::get(self.path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "ha-lb-check")
            .body(Empty::<Bytes>::new())
            .expect("a GET with a valid path");
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(e) => return (CheckResult::Fail, format!("HTTP: {e}")),
        };
        let status = response.status().as_u16();
        let body = match Limited::new(response.into_body(), MAX_BODY).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return (CheckResult::Fail, format!("HTTP body: {e}")),
        };
        if status != self.expect_status {
            return (CheckResult::NotReady, format!("status {status}"));
        }
        if let Some(expected) = &self.expect_body
            && !String::from_utf8_lossy(&body).contains(expected.as_str())
        {
            return (
                CheckResult::NotReady,
                format!("status {status}, body lacks {expected:?}"),
            );
        }
        (CheckResult::Pass, format!("status {status}"))
    }
}

fn connect_error(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        _ => format!("connect: {error}"),
    }
}

fn pem_error(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> ProbeSetupError + '_ {
    move |e| ProbeSetupError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn tls_config(check: &CheckConfig) -> Result<ClientConfig, ProbeSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &check.verify {
        Verify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider))),
        Verify::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(pem_error(path))? {
                roots.add(cert.map_err(pem_error(path))?)?;
            }
            builder.with_root_certificates(roots)
        }
    };
    Ok(match (&check.client_cert, &check.client_key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .map_err(pem_error(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_error(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem_error(key))?;
            builder.with_client_auth_cert(certs, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// `verify: none`: any certificate is accepted (handshake signatures are
/// still checked, so the peer holds the key of the certificate it showed).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
