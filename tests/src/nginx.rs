//! nginx as a lab host's server: the benchmark's backends and the file
//! servers of the end-to-end suites.

use std::{
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use crate::{Lab, LabProcess, Result, io_error};

/// nginx on `host`, one worker with `worker_connections`, one server that
/// listens on the host's address and `port`: `server(dir)` is the rest of
/// the server block after `listen ADDRESS:PORT` (`dir`: nginx's directory
/// under the lab's log directory). Returns once it accepts connections from
/// the lab's `client` host.
///
/// # Errors
/// Writing the config, starting nginx, or nginx not listening within 10 s.
pub fn start_server(
    lab: &Lab,
    host: &str,
    port: u16,
    worker_connections: u32,
    server: impl Fn(&Path) -> String,
) -> Result<LabProcess> {
    let dir = lab.log_dir().join(format!("nginx-{host}"));
    std::fs::create_dir_all(&dir).map_err(io_error("nginx dir"))?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections {worker_connections}; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
               server {{ listen {}:{port}{} }}\n}}\n",
            lab.host(host).addr,
            server(&dir),
            dir = dir.display()
        ),
    )
    .map_err(io_error("writing a benchmark config"))?;
    let mut process = lab.spawn(
        host,
        &[
            "nginx",
            "-c",
            conf.to_str().unwrap(),
            "-p",
            dir.to_str().unwrap(),
        ],
    )?;
    let addr = SocketAddr::from((lab.host(host).addr, port));
    lab.wait_until(Duration::from_secs(10), "nginx listening", || {
        lab.in_host("client", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false)
    })?;
    process.wait_timeout(Duration::ZERO)?;
    Ok(process)
}
