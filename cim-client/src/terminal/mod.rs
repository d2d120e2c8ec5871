//! The terminal chat client: the `cim-client` binary.
//!
//! ```text
//! cim-client --route http://127.0.0.1:8080 --name alice [--register] [--transport tcp|ws|ws-json]
//!            [--tls auto|on|off] [--ca-file ca.pem]
//! ```
//!
//! TLS: with an `https://` route the client uses the server's TLS address when the login
//! offers one (`--tls auto`, the default); `--tls on` requires it, `--tls off` never uses
//! it. `--ca-file` (or `CIM_CA_FILE`) adds a CA to the system's roots.
//!
//! Logs in through the route (password from `CIM_PASSWORD`, else asked without echo), then
//! reads lines: a plain line goes to everyone online, `bob;;hi` or `@bob hi` to bob alone,
//! `#room1 hi` to the online members of channel `room1` (after `:join room1`), `:g 7 hi` to
//! stored group 7 (`:gnew`, `:groups`, `:hist`, `:unread`), `:`-commands
//! do the rest (`:help` lists them). Received messages, send results and
//! connection state changes print above the line being typed.
//!
//! # Modules
//! - [`command`]: what a typed line means (pure parser).
//! - [`render`]: how everything is shown (pure formatting, optional colour).
//! - [`history`]: the local message history file and its search.
//! - [`input`]: the line editor thread (rustyline) and the output thread that prints above it.
//! - [`app`]: the event loop tying the SDK's [`cim_sdk::Client`] to the above.
//!
//! Files, under `<data dir>/<route host>/<user>/` where the data dir is `--data-dir` or the
//! platform's (`~/.local/share/cim` on Linux): `history.jsonl` (messages, bounded) and
//! `input_history.txt` (typed lines, for the up arrow).

pub mod app;
pub mod command;
pub mod history;
pub mod input;
pub mod render;

use cim_sdk::{TlsMode, Transport};
use clap::{Parser, ValueEnum};
use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
};

/// Environment variable the password is read from (for scripts); asked on the terminal
/// otherwise. Never a flag: flags are visible to every user of the machine in `ps`.
pub const PASSWORD_ENV: &str = "CIM_PASSWORD";

/// Transport choices on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// TCP, length-delimited protobuf.
    Tcp,
    /// WebSocket, protobuf binary frames.
    Ws,
    /// WebSocket, proto3 JSON text frames.
    WsJson,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Ws => Transport::WsBinary,
            TransportArg::WsJson => Transport::WsJson,
        }
    }
}

/// TLS choices on the command line (see [`TlsMode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TlsArg {
    /// TLS when the route URL is https:// and the server offers a TLS address.
    Auto,
    /// Always TLS to the server (fails if it offers none).
    On,
    /// Never TLS to the server.
    Off,
}

impl From<TlsArg> for TlsMode {
    fn from(t: TlsArg) -> Self {
        match t {
            TlsArg::Auto => TlsMode::Auto,
            TlsArg::On => TlsMode::On,
            TlsArg::Off => TlsMode::Off,
        }
    }
}

/// cim terminal chat client.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cim-client",
    version,
    after_help = "The password is read from the CIM_PASSWORD environment variable, or asked \
                  without echo.\nType :help once connected for the commands."
)]
pub struct Args {
    /// Base URL of a route (or of the load balancer in front of the routes).
    #[arg(long, env = "CIM_ROUTE", default_value = "http://127.0.0.1:8080")]
    pub route: String,
    /// User name to log in as.
    #[arg(long, env = "CIM_NAME")]
    pub name: String,
    /// Create the account first. If the name is taken, say so and log in to it.
    #[arg(long)]
    pub register: bool,
    /// How to connect to the connection server.
    #[arg(long, value_enum, default_value_t = TransportArg::Tcp)]
    pub transport: TransportArg,
    /// TLS to the connection server: auto (when the route is https:// and the server offers
    /// it), on, off.
    #[arg(long, value_enum, default_value_t = TlsArg::Auto)]
    pub tls: TlsArg,
    /// CA certificate (PEM) trusted besides the system's roots, for https:// routes and
    /// TLS servers with certificates of their own CA.
    #[arg(long, env = "CIM_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Where history files live (default: the platform data dir + /cim, e.g.
    /// ~/.local/share/cim); files go under DATA_DIR/ROUTE_HOST/USER/.
    #[arg(long, env = "CIM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most messages kept in the local history.
    #[arg(long, default_value_t = history::DEFAULT_MAX_LINES, value_parser = clap::value_parser!(usize))]
    pub history_lines: usize,
}

/// The binary's `main`: parse arguments, read the password, run the client.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let style = render::Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let password = match read_password(&args.name) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", render::error(style, &e));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(app::run(args, password, style))
}

fn read_password(name: &str) -> Result<String, String> {
    if let Ok(p) = std::env::var(PASSWORD_ENV) {
        return Ok(p);
    }
    // rpassword reads from the controlling terminal with echo off, so it works even when
    // stdin is a pipe; without any terminal, say how scripts pass the password.
    rpassword::prompt_password(format!("password for {name}: "))
        .map_err(|e| format!("cannot read the password ({e}); scripts set {PASSWORD_ENV}"))
}

/// `<base>/<route host>/<user>`: one directory per account, apart per cluster.
pub fn user_dir(base: &Path, route_url: &str, name: &str) -> PathBuf {
    base.join(path_component(&route_host(route_url)))
        .join(path_component(name))
}

/// The default base: the platform data dir + `cim` (`None` when the platform has none).
pub fn default_data_dir() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("cim"))
}

/// `host:port` of a URL (`http://h:8080/x` → `h:8080`).
fn route_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials in a URL are not part of where the cluster is.
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.is_empty() {
        "route".into()
    } else {
        host.into()
    }
}

/// A string made safe as one path component: names may contain `/`, `..` or `:` (the route
/// only forbids whitespace and `; @ # |`), which must neither escape the data dir nor break on
/// file systems that reject `:`. Other bytes are kept readable; unsafe ones become `%XX`.
fn path_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if out.is_empty() || out.chars().all(|c| c == '.') {
        out = out.replace('.', "%2E");
        if out.is_empty() {
            out.push('_');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_dirs_are_per_route_and_user() {
        let base = Path::new("/data");
        assert_eq!(
            user_dir(base, "http://127.0.0.1:8080", "alice"),
            Path::new("/data/127.0.0.1%3A8080/alice")
        );
        assert_eq!(
            user_dir(base, "https://u:p@chat.example.com/api/", "张三"),
            Path::new("/data/chat.example.com/张三")
        );
    }

    #[test]
    fn path_components_cannot_escape() {
        assert_eq!(path_component(".."), "%2E%2E");
        assert_eq!(path_component("."), "%2E");
        assert_eq!(path_component(""), "_");
        assert_eq!(path_component("a/../b"), "a%2F..%2Fb");
        assert_eq!(path_component("a\\b"), "a%5Cb");
        assert_eq!(path_component("...x"), "...x");
        assert_eq!(route_host("no-scheme:1/x"), "no-scheme:1");
        assert_eq!(route_host("http://"), "route");
    }

    #[test]
    fn arguments_parse_with_defaults() {
        let a = Args::try_parse_from(["cim-client", "--name", "alice"]).unwrap();
        assert_eq!(a.route, "http://127.0.0.1:8080");
        assert_eq!(a.transport, TransportArg::Tcp);
        assert!(!a.register);
        assert_eq!(a.history_lines, history::DEFAULT_MAX_LINES);
        let a = Args::try_parse_from([
            "cim-client",
            "--route",
            "http://r:1",
            "--name",
            "bob",
            "--register",
            "--transport",
            "ws-json",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(Transport::from(a.transport), Transport::WsJson);
        assert!(a.register);
        assert_eq!(a.data_dir.as_deref(), Some(Path::new("/tmp/x")));
        assert_eq!(Transport::from(TransportArg::Ws), Transport::WsBinary);
        assert!(Args::try_parse_from(["cim-client", "--name", "a", "--transport", "udp"]).is_err());
    }

    #[test]
    fn tls_arguments() {
        let a = Args::try_parse_from(["cim-client", "--name", "alice"]).unwrap();
        assert_eq!(TlsMode::from(a.tls), TlsMode::Auto);
        let a = Args::try_parse_from([
            "cim-client",
            "--name",
            "alice",
            "--tls",
            "on",
            "--ca-file",
            "/etc/cim/ca.pem",
        ])
        .unwrap();
        assert_eq!(TlsMode::from(a.tls), TlsMode::On);
        assert_eq!(a.ca_file.as_deref(), Some(Path::new("/etc/cim/ca.pem")));
        let a = Args::try_parse_from(["cim-client", "--name", "a", "--tls", "off"]).unwrap();
        assert_eq!(TlsMode::from(a.tls), TlsMode::Off);
        assert!(Args::try_parse_from(["cim-client", "--name", "a", "--tls", "maybe"]).is_err());
    }
}
