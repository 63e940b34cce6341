//! `ha-user`: the ha-lb agent and its command line. A thin edge over the library.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use ha_user::{
    admin,
    agent::{self, AttachOptions, PinLocation},
    config::{Config, DEFAULT_CONFIG_PATH},
    control::{Request, Response},
    dataplane::AttachMode,
    handover::StopIntent,
};

#[derive(Parser)]
#[command(
    name = "ha-user",
    version,
    about = "ha-lb: XDP load balancer for the Kubernetes control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program on an interface, serve the configured VIPs, run until SIGTERM/SIGINT.
    Attach {
        /// Interface that receives the VIP's traffic.
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// `auto` and `native` attach in native (driver) mode or fail; `generic` is refused
        /// (a NAT cannot rewrite generic mode's GRO-merged packets correctly).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpModeArg,
        /// Print per-VIP, per-backend and per-verdict counters this often (0s: never).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        stats_interval: Duration,
        /// Pin the program's link, the flow tables and the agent record here
        /// (a directory on a bpffs) instead of /sys/fs/bpf/ha-lb/[netns-<inode>/]<iface>.
        #[arg(long, conflicts_with = "no_pin")]
        pin_dir: Option<PathBuf>,
        /// Do not pin the program's link and tables: the data path then goes
        /// with the agent, and a restart starts with empty tables.
        #[arg(long)]
        no_pin: bool,
        /// What SIGTERM and SIGINT do: `release` (the host goes out of service:
        /// VRRP priority 0, VIP addresses removed, program detached, pins
        /// removed) or `keep` (a restart or upgrade in place: program, flow
        /// tables and VIP addresses stay for the next agent). See docs/operations.md.
        #[arg(long, value_enum, default_value = "release")]
        on_stop: OnStopArg,
        /// Start even when the pinned flow tables cannot be adopted by this
        /// build or config (their connections are lost); without it the agent
        /// refuses and the attached program keeps serving them.
        #[arg(long)]
        accept_flow_loss: bool,
    },
    /// Validate a config file and print it normalized (defaults filled in).
    /// With --iface, also say what an agent started now would do with what
    /// is pinned for that interface (adopt, replace, refuse), on stderr.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        iface: Option<String>,
        #[arg(long, requires = "iface")]
        pin_dir: Option<PathBuf>,
        #[arg(long, requires = "iface")]
        accept_flow_loss: bool,
    },
    /// Stop the running agent with an intent: --keep (restart or upgrade in
    /// place) or --release (the host goes out of service).
    Stop {
        #[arg(long, conflicts_with = "release", required_unless_present = "release")]
        keep: bool,
        #[arg(long)]
        release: bool,
        #[arg(long)]
        iface: Option<String>,
    },
    /// Remove everything ha-lb put on an interface: the program, its pinned
    /// link and tables, the VIP addresses it added. Asks a running agent to
    /// release; works without one too.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Print the ha-lb config equivalent to a haproxy.cfg (and keepalived.conf),
    /// listing every directive that was not carried over.
    Import {
        #[arg(long)]
        haproxy: PathBuf,
        /// The VIP addresses and VRRP settings; without it the VIPs are the
        /// frontends' bind addresses, owned statically.
        #[arg(long)]
        keepalived: Option<PathBuf>,
    },
    /// Show every VIP and backend: state, last check, counters.
    Status {
        /// The agent's interface (default: the only agent in this network namespace).
        #[arg(long)]
        iface: Option<String>,
        /// JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Planned maintenance: no new flows to BACKEND (ADDRESS or ADDRESS:PORT); established flows stay.
    Drain {
        vip: String,
        backend: String,
        #[arg(long)]
        iface: Option<String>,
    },
    /// Undo `drain`: the backend follows its health checks again.
    Undrain {
        vip: String,
        backend: String,
        #[arg(long)]
        iface: Option<String>,
    },
    /// Re-read the agent's config (as SIGHUP does) and say whether it was applied.
    Reload {
        #[arg(long)]
        iface: Option<String>,
    },
}

/// `--xdp-mode`: the CLI's spelling of [`AttachMode`].
#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpModeArg {
    Auto,
    Native,
    Generic,
}

impl From<XdpModeArg> for AttachMode {
    fn from(mode: XdpModeArg) -> Self {
        match mode {
            XdpModeArg::Auto => AttachMode::Auto,
            XdpModeArg::Native => AttachMode::Native,
            XdpModeArg::Generic => AttachMode::Generic,
        }
    }
}

/// `--on-stop`: the CLI's spelling of [`StopIntent`] (each value's help is
/// what `attach --help` lists).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnStopArg {
    /// The host goes out of service: VRRP priority 0 (a peer takes over at
    /// once), VIP addresses and neighbour entries removed, program detached,
    /// pins removed.
    Release,
    /// The agent restarts or is upgraded in place: program, flow tables and
    /// VIP addresses stay, and the data path goes on serving the last desired
    /// state until the next agent adopts it.
    Keep,
}

impl From<OnStopArg> for StopIntent {
    fn from(intent: OnStopArg) -> Self {
        match intent {
            OnStopArg::Release => StopIntent::Release,
            OnStopArg::Keep => StopIntent::Keep,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ha-user: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn import(haproxy: &std::path::Path, keepalived: Option<&std::path::Path>) -> Result<()> {
    let haproxy_text = read(haproxy)?;
    let keepalived_text = keepalived.map(read).transpose()?;
    let haproxy_name = haproxy.display().to_string();
    let keepalived_name = keepalived.map(|p| p.display().to_string());
    let keepalived_source = match (&keepalived_name, &keepalived_text) {
        (Some(name), Some(text)) => Some(ha_user::import::Source { name, text }),
        _ => None,
    };
    let imported = ha_user::import::import(
        &ha_user::import::Source {
            name: &haproxy_name,
            text: &haproxy_text,
        },
        keepalived_source.as_ref(),
    )?;
    let mut sources = vec![haproxy_name.as_str()];
    sources.extend(keepalived_name.as_deref());
    let yaml = ha_user::import::render(&imported, &sources);
    print!("{yaml}");
    eprintln!(
        "ha-user import: {} VIPs; {} directives not carried over or changed, listed at the top of the output",
        imported.config.vips.len(),
        imported.notes.len()
    );
    // Files named by the checks (CA, client certificates) may live only on
    // the LB hosts: say so, but the translation itself stands.
    if let Err(e) = Config::from_yaml(&yaml, "the imported config") {
        eprintln!("ha-user import: warning: on this host, {e}");
    }
    Ok(())
}

/// One request to the running agent; a refusal becomes an error (exit 1).
fn ask(iface: Option<&str>, request: &Request) -> Result<Response> {
    let response = admin::request(iface, request)?;
    if !response.ok {
        bail!(
            "{}",
            response
                .message
                .unwrap_or_else(|| "the agent refused".to_string())
        );
    }
    Ok(response)
}

fn pin_location(pin_dir: Option<PathBuf>, no_pin: bool) -> PinLocation {
    match (pin_dir, no_pin) {
        (_, true) => PinLocation::Off,
        (Some(dir), false) => PinLocation::Dir(dir),
        (None, false) => PinLocation::Auto,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Attach {
            iface,
            config,
            xdp_mode,
            stats_interval,
            pin_dir,
            no_pin,
            on_stop,
            accept_flow_loss,
        } => {
            let pin = pin_location(pin_dir, no_pin);
            runtime()?.block_on(agent::run(AttachOptions {
                iface,
                config_path: config,
                xdp_mode: xdp_mode.into(),
                stats_interval,
                pin,
                on_stop: on_stop.into(),
                accept_flow_loss,
            }))
        }
        Command::CheckConfig {
            config,
            iface,
            pin_dir,
            accept_flow_loss,
        } => {
            let pin = pin_location(pin_dir, false);
            let (yaml, pinned) = agent::check_config(
                &config,
                iface.as_deref().map(|iface| (iface, &pin)),
                accept_flow_loss,
            )?;
            print!("{yaml}");
            if let Some(pinned) = pinned {
                eprintln!("{pinned}");
            }
            Ok(())
        }
        Command::Stop { keep, iface, .. } => {
            let intent = if keep {
                StopIntent::Keep
            } else {
                StopIntent::Release
            };
            let agents = admin::running_agents();
            let target = match (&iface, agents.as_slice()) {
                (Some(iface), _) => iface.clone(),
                (None, [one]) => one.clone(),
                _ => String::new(),
            };
            println!(
                "{}",
                ask(iface.as_deref(), &Request::Stop { intent })?
                    .message
                    .unwrap_or_default()
            );
            // Return once the agent is gone (its admin socket closes last).
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while admin::running_agents().contains(&target) {
                if std::time::Instant::now() > deadline {
                    bail!("the agent on {target} has not exited after 30 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("the agent on {target} has exited");
            Ok(())
        }
        Command::Detach { iface, pin_dir } => {
            let pin = pin_location(pin_dir, false);
            println!("{}", runtime()?.block_on(agent::detach(&iface, &pin))?);
            Ok(())
        }
        Command::Import {
            haproxy,
            keepalived,
        } => import(&haproxy, keepalived.as_deref()),
        Command::Status { iface, json } => {
            let response = ask(iface.as_deref(), &Request::Status)?;
            let status = response.status.context("the agent sent no status")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Command::Drain {
            vip,
            backend,
            iface,
        } => {
            println!(
                "{}",
                ask(iface.as_deref(), &Request::Drain { vip, backend })?
                    .message
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Undrain {
            vip,
            backend,
            iface,
        } => {
            println!(
                "{}",
                ask(iface.as_deref(), &Request::Undrain { vip, backend })?
                    .message
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Reload { iface } => {
            println!(
                "{}",
                ask(iface.as_deref(), &Request::Reload)?
                    .message
                    .unwrap_or_default()
            );
            Ok(())
        }
    }
}
