//! A stand-in kube-apiserver for tests and the demo.
//!
//! One TCP port serves three things, told apart by the client's first bytes
//! (plain HTTP `GET ` serves the same paths as HTTPS):
//! - TLS (first byte 0x16): HTTPS with a self-signed certificate, answering
//!   `/livez`, `/readyz`, `/healthz` like a kube-apiserver and `/whoami` with
//!   the server's name and the client address it saw;
//! - anything else: a line protocol for long-lived connections through the
//!   VIP: `whoami` answers `<name> <client-ip:port>`, any other line is echoed.
//!
//! Readiness follows a kube-apiserver's graceful shutdown: after SIGTERM (or
//! SIGUSR1, or while the `--not-ready-file` exists) `/readyz` answers 500
//! while every other path keeps serving. SIGUSR2 makes it ready again.
//! `--hang` accepts connections and never answers (until SIGUSR2).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Parser;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    signal::unix::{SignalKind, signal},
};
use tokio_rustls::TlsAcceptor;

const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Parser)]
#[command(about = "Stand-in kube-apiserver: HTTPS health endpoints, /whoami, and a line echo mode")]
struct Args {
    /// Name reported by /whoami and the line protocol.
    #[arg(long)]
    name: String,
    /// Address and port to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// While this file exists, /readyz answers 500.
    #[arg(long)]
    not_ready_file: Option<PathBuf>,
    /// Write the self-signed certificate (PEM) here, for probes that verify it.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// After SIGTERM, keep serving (with /readyz failing) this long before exiting,
    /// like kube-apiserver's --shutdown-delay-duration.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    shutdown_delay: Duration,
    /// Accept connections and never answer (a hung apiserver), until SIGUSR2.
    #[arg(long)]
    hang: bool,
    /// Require TLS clients to present a certificate signed by this CA (PEM), as etcd does.
    #[arg(long)]
    client_ca: Option<PathBuf>,
}

struct State {
    name: String,
    ready: AtomicBool,
    hung: AtomicBool,
    not_ready_file: Option<PathBuf>,
}

impl State {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
            && !self
                .not_ready_file
                .as_ref()
                .is_some_and(|path| path.exists())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let acceptor = tls_acceptor(&args).context("building the TLS configuration")?;
    let state = Arc::new(State {
        name: args.name.clone(),
        ready: AtomicBool::new(true),
        hung: AtomicBool::new(args.hang),
        not_ready_file: args.not_ready_file.clone(),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "standin-apiserver {} listening on {}",
        args.name, args.listen
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigusr1 = signal(SignalKind::user_defined1())?;
    let mut sigusr2 = signal(SignalKind::user_defined2())?;
    let mut shutdown_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = async {
            match shutdown_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => { eprintln!("accept: {error}"); continue; }
                };
                let state = state.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve_connection(stream, peer, state, acceptor).await {
                        eprintln!("connection from {peer}: {error:#}");
                    }
                });
            }
            _ = sigusr1.recv() => { state.ready.store(false, Ordering::Relaxed); println!("not ready (SIGUSR1)"); }
            _ = sigusr2.recv() => {
                state.ready.store(true, Ordering::Relaxed);
                state.hung.store(false, Ordering::Relaxed);
                println!("ready (SIGUSR2)");
            }
            _ = sigterm.recv() => {
                state.ready.store(false, Ordering::Relaxed);
                println!("SIGTERM: /readyz failing, exiting in {:?}", args.shutdown_delay);
                shutdown_at = Some(tokio::time::Instant::now() + args.shutdown_delay);
            }
            _ = deadline => { println!("exiting"); return Ok(()); }
        }
    }
}

fn tls_acceptor(args: &Args) -> Result<TlsAcceptor> {
    let names = vec![
        args.name.clone(),
        args.listen.ip().to_string(),
        "localhost".to_string(),
    ];
    let certified =
        rcgen::generate_simple_self_signed(names).context("generating the certificate")?;
    if let Some(path) = &args.cert_out {
        std::fs::write(path, certified.cert.pem())
            .with_context(|| format!("writing the certificate to {}", path.display()))?;
    }
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &args.client_ca {
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)? {
                roots.add(cert?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(vec![cert], key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    acceptor: TlsAcceptor,
) -> Result<()> {
    // As Go servers (kube-apiserver, etcd) do: without it a response written
    // in several TLS records waits for the client's delayed ACK (40 ms).
    let _ = stream.set_nodelay(true);
    if state.hung.load(Ordering::Relaxed) {
        // Hold the connection open and say nothing, as a wedged process would.
        let _held = stream;
        return std::future::pending::<Result<()>>().await;
    }
    let mut first = [0u8; 4];
    let mut seen = 0;
    // Enough bytes to tell TLS, plain HTTP and the line protocol apart.
    while seen < 4 {
        seen = stream.peek(&mut first).await?;
        if seen == 0 || first[0] == TLS_HANDSHAKE_RECORD || first[..seen].contains(&b'\n') {
            break;
        }
        if seen < 4 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if seen == 0 {
        return Ok(());
    }
    if &first == b"GET " {
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(respond(&request, &state, peer)) }
        });
        http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await
            .context("HTTP")?;
        return Ok(());
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        let tls = acceptor.accept(stream).await.context("TLS handshake")?;
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(respond(&request, &state, peer)) }
        });
        http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .await
            .context("HTTP")?;
        Ok(())
    } else {
        serve_lines(stream, peer, &state).await
    }
}

fn respond<B>(request: &Request<B>, state: &State, peer: SocketAddr) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/livez" | "/healthz" => (StatusCode::OK, "ok".to_string()),
        "/readyz" if state.is_ready() => (StatusCode::OK, "ok".to_string()),
        "/readyz" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "[-]shutdown failed: reason withheld\nreadyz check failed\n".to_string(),
        ),
        "/whoami" => (
            StatusCode::OK,
            format!("server={} client={peer}\n", state.name),
        ),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

async fn serve_lines(stream: TcpStream, peer: SocketAddr, state: &State) -> Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = if line.trim() == "whoami" {
            format!("{} {peer}\n", state.name)
        } else {
            format!("{line}\n")
        };
        writer.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}
