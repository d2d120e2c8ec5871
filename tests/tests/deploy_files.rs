//! The deployment files use only what the binaries really have, and agree with each other.
//!
//! Files: `Dockerfile`, `.dockerignore`, `deploy/compose/compose.yaml`, `deploy/k8s/*`,
//! `deploy/nginx/cim.conf`, `deploy/prometheus/*.yml`, `deploy/grafana/cim-dashboard.json`, and
//! the commands in README.md's "Deploying" section and deploy/k8s/README.md. Checked:
//!
//! - every YAML document and the dashboard JSON parse;
//! - every command and `--flag` given to a cim binary appears in that binary's `--help` (the
//!   binaries of this test's profile; built first when missing or stale, see [`binaries`]);
//! - every `CIM_*` environment variable of a cim container is a real setting: the variables
//!   go through the binaries' own loader (`cim_common::config::load`: unknown fields are
//!   refused, values must have the field's type) and the result through `validate()`;
//! - ports and hosts agree: published and advertised ports (compose), container ports,
//!   Services, probes and scrape annotations (k8s), upstreams (nginx) and scrape targets
//!   (Prometheus) against the listeners the loaded settings bind; backend URLs name the etcd /
//!   Redis services; grace periods outlast the drains;
//! - `nginx -t` accepts the nginx config (Debian's nginx, see [`nginx_config_is_valid`]);
//! - probe and scrape paths answer on a real server and route (started with the testkit):
//!   [`ANSWER_200`] lists the paths that must answer 200;
//! - every metric name of the dashboard's queries is one of [`METRICS`], and every one of
//!   [`METRICS`] is exported by the live server's or route's `/metrics`.

use cim_route::RouteConfig;
use cim_server::ServerConfig;
use cim_standalone::StandaloneConfig;
use cim_tests::docs::markdown_code;
use serde_json::{Map, Value as Json};
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// Paths used by probes and scrapes that must answer 200 on the listener they are used on.
const ANSWER_200: &[&str] = &["/healthz", "/metrics"];

/// The metric names the binaries export (and the dashboard may use). Histograms also have
/// `_bucket`, `_sum` and `_count` series.
const METRICS: &[&str] = &[
    "cim_server_connections",
    "cim_server_logins_total",
    "cim_server_login_failures_total",
    "cim_server_disconnects_total",
    "cim_server_frames_in_total",
    "cim_server_frames_out_total",
    "cim_server_slow_consumer_kicks_total",
    "cim_server_acks_dropped_total",
    "cim_server_forward_queue_depth",
    "cim_server_held_senders",
    "cim_server_forward_call_seconds",
    "cim_route_logins_total",
    "cim_route_login_failures_total",
    "cim_route_messages_total",
    "cim_route_push_call_seconds",
    "cim_route_inbox_store_seconds",
    "cim_route_sse_subscribers",
    "cim_route_webhook_lag_events",
    "cim_route_webhook_lag_seconds",
    "cim_backend_errors_total",
    "cim_build_info",
    "process_resident_memory_bytes",
];
const HISTOGRAMS: &[&str] = &[
    "cim_server_forward_call_seconds",
    "cim_route_push_call_seconds",
    "cim_route_inbox_store_seconds",
];

/// Prometheus job names of the two kinds of process (compose static configs, the k8s
/// relabelling from `app.kubernetes.io/name`, the dashboard's `job` matchers).
const JOBS: [(&str, Kind); 2] = [("cim-server", Kind::Server), ("cim-route", Kind::Route)];

/// Values a test run gives the compose variables that have no default (`${VAR:?message}`).
const COMPOSE_REQUIRED: &[(&str, &str)] = &[("CIM_CLUSTER_SECRET", "deploy-files-test-secret-01")];

/// Stand-ins for what Kubernetes fills in at run time (`fieldRef`).
const SAMPLE_POD_IP: &str = "10.1.2.3";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every YAML document of a file (`---` separated), merge keys (`<<: *anchor`) applied, as JSON.
fn yaml_docs(path: &Path) -> Vec<Json> {
    use serde::Deserialize;
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", rel(path)));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: merge keys: {e}", rel(path)));
            serde_json::to_value(&value)
                .unwrap_or_else(|e| panic!("{}: not representable as JSON: {e}", rel(path)))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(path: &Path) -> Json {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one YAML document expected", rel(path));
    docs.remove(0)
}

/// Failures collected over a whole check, reported together.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(what());
        }
    }

    fn add(&mut self, what: String) {
        self.0.push(what);
    }

    fn assert_none(self, about: &str) {
        assert!(
            self.0.is_empty(),
            "{about}: {} problem(s):\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not host:port"))
}

fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// `host:port` of a URL such as `redis://redis:6379/0` or `http://etcd:2379`.
fn url_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

// ---------------------------------------------------------------------------------------------
// The binaries

/// The workspace's binaries in this test's profile: name → path.
///
/// This crate cannot name other packages' binaries (`env!("CARGO_BIN_EXE_...")` is only set
/// for a package's own), so they are found beside this test's profile directory
/// (`target/<profile>/`). A full `cargo test --workspace` has just built them there (the
/// integration tests of cim-server, cim-route, cim-client and cim-standalone need them);
/// when one is missing or older than a source it is built from, this runs
/// `cargo build --workspace --bins --profile <this profile>` first. (Always building would
/// not be free: with every dev-dependency's features, as a workspace test run has them,
/// tokio has `test-util`, so a plain `cargo build` is a second build of most of the tree.)
fn binaries() -> &'static BTreeMap<String, PathBuf> {
    static BINARIES: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let run = |args: &[&str]| -> String {
            let output = Command::new(&cargo)
                .current_dir(repo())
                .args(args)
                .output()
                .expect("running cargo");
            assert!(
                output.status.success(),
                "cargo {} failed:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        // Names, and the packages binaries are built from (all but this one).
        let metadata: Json =
            serde_json::from_str(&run(&["metadata", "--no-deps", "--format-version", "1"]))
                .unwrap();
        let mut names = BTreeSet::new();
        let mut sources = vec![repo().join("Cargo.lock"), repo().join("proto")];
        for package in metadata["packages"].as_array().unwrap() {
            for target in package["targets"].as_array().unwrap() {
                if target["kind"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k == "bin")
                {
                    names.insert(target["name"].as_str().unwrap().to_string());
                }
            }
            if package["name"] != env!("CARGO_PKG_NAME") {
                let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap());
                sources.push(manifest.parent().unwrap().to_path_buf());
            }
        }
        assert!(!names.is_empty(), "cargo metadata lists no binary");

        // target/<profile>/deps/deploy_files-<hash> → target/<profile>/
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
        let found: BTreeMap<String, PathBuf> = names
            .iter()
            .map(|name| (name.clone(), profile_dir.join(name)))
            .collect();
        let newest_source = sources.iter().filter_map(|p| newest_mtime(p)).max();
        let fresh = found.values().all(|bin| {
            let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
            matches!((built, newest_source), (Some(b), Some(s)) if b >= s)
        });
        if !fresh {
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev".to_string(),
                Some(other) => other.to_string(),
            };
            run(&["build", "--workspace", "--bins", "--profile", &profile]);
        }
        for bin in found.values() {
            assert!(bin.is_file(), "{} was not built", bin.display());
        }
        found
    })
}

/// The latest modification time of a file, or of the files under a directory (build
/// outputs and node_modules left out).
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| {
            !matches!(
                e.file_name().to_str(),
                Some("target" | "node_modules" | ".git")
            )
        })
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// `binary [subcommand] --help`, stdout.
fn help(binary: &str, subcommand: Option<&str>) -> String {
    static HELP: OnceLock<std::sync::Mutex<BTreeMap<String, String>>> = OnceLock::new();
    let key = format!("{binary} {}", subcommand.unwrap_or(""));
    let cache = HELP.get_or_init(Default::default);
    if let Some(text) = cache.lock().unwrap().get(&key) {
        return text.clone();
    }
    let path = &binaries()[binary];
    let mut command = Command::new(path);
    command.args(subcommand).arg("--help");
    let output = command.output().unwrap();
    assert!(output.status.success(), "{key} --help failed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    cache.lock().unwrap().insert(key, text.clone());
    text
}

/// The subcommands a binary's help lists (`Commands:` section).
fn subcommands(binary: &str) -> Vec<String> {
    let text = help(binary, None);
    let Some((_, rest)) = text.split_once("Commands:\n") else {
        return Vec::new();
    };
    rest.lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Whether `flag` (`--name`) is listed in `text` as a flag of its own.
fn help_lists(text: &str, flag: &str) -> bool {
    text.match_indices(flag).any(|(at, _)| {
        let next = text[at + flag.len()..].chars().next();
        let before = text[..at].chars().next_back();
        !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-')
            && !matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-')
    })
}

/// One use of a cim binary in a file: `binary args...`.
#[derive(Debug, Clone)]
struct Invocation {
    binary: String,
    args: Vec<String>,
    source: String,
}

impl Invocation {
    fn flags(&self) -> impl Iterator<Item = &str> {
        self.args
            .iter()
            .filter(|a| a.starts_with("--") && a.len() > 2)
            .map(|a| a.split_once('=').map_or(a.as_str(), |(flag, _)| flag))
    }
}

/// The invocations of cim binaries in free text (shell lines of a README, comments): a word
/// naming a binary starts one, a shell separator ends it.
fn invocations_in_text(text: &str, source: &str) -> Vec<Invocation> {
    let names: BTreeSet<&str> = binaries().keys().map(String::as_str).collect();
    let joined = text.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined.lines() {
        let line = line.trim_start_matches(|c: char| c == '#' || c.is_whitespace());
        let words: Vec<&str> = line.split_whitespace().collect();
        for (i, word) in words.iter().enumerate() {
            if !names.contains(word) {
                continue;
            }
            let args = words[i + 1..]
                .iter()
                .take_while(|w| !matches!(**w, "|" | "||" | "&&" | ";" | "#" | "&"))
                .map(|w| {
                    w.trim_matches(|c| c == '\'' || c == '"' || c == '`')
                        .to_string()
                })
                .collect();
            found.push(Invocation {
                binary: word.to_string(),
                args,
                source: source.to_string(),
            });
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Settings from the environment

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Server,
    Route,
    Standalone,
}

impl Kind {
    fn of(binary: &str) -> Option<Kind> {
        match binary {
            "cim-server" => Some(Kind::Server),
            "cim-route" => Some(Kind::Route),
            "cim-standalone" => Some(Kind::Standalone),
            _ => None,
        }
    }

    /// The environment prefix of the binary (its main.rs / lib.rs).
    fn prefix(self) -> &'static str {
        match self {
            Kind::Server => "CIM_SERVER_",
            Kind::Route => "CIM_ROUTE_",
            Kind::Standalone => cim_standalone::ENV_PREFIX,
        }
    }

    fn defaults(self) -> Json {
        match self {
            Kind::Server => serde_json::to_value(ServerConfig::default()),
            Kind::Route => serde_json::to_value(RouteConfig::default()),
            Kind::Standalone => serde_json::to_value(StandaloneConfig::default()),
        }
        .unwrap()
    }
}

/// What a cim container's settings resolve to.
#[derive(Debug, Clone)]
enum Loaded {
    Server(Box<ServerConfig>),
    Route(Box<RouteConfig>),
    Standalone(Box<StandaloneConfig>),
}

impl Loaded {
    fn server(&self) -> &ServerConfig {
        match self {
            Loaded::Server(c) => c,
            other => panic!("not a server: {other:?}"),
        }
    }

    fn route(&self) -> &RouteConfig {
        match self {
            Loaded::Route(c) => c,
            other => panic!("not a route: {other:?}"),
        }
    }

    fn backend(&self) -> &cim_common::backend::BackendConfig {
        match self {
            Loaded::Server(c) => &c.backend,
            Loaded::Route(c) => &c.backend,
            Loaded::Standalone(c) => &c.server.backend,
        }
    }
}

/// A value as figment's environment provider reads it: TOML-like lists, tables, numbers and
/// booleans, anything else a string.
fn env_value(raw: &str) -> Json {
    match serde_json::from_str::<Json>(raw) {
        Ok(v @ (Json::Array(_) | Json::Object(_) | Json::Number(_) | Json::Bool(_))) => v,
        _ => Json::String(raw.to_string()),
    }
}

/// Loads the settings of a `kind` process from its environment through the binary's loader
/// (defaults < environment), then validates them. Errors name the variable.
fn load_env(kind: Kind, env: &BTreeMap<String, String>, source: &str) -> Result<Loaded, String> {
    let prefix = kind.prefix();
    let defaults = kind.defaults();
    let mut layer = Map::new();
    for (name, raw) in env {
        if !name.starts_with("CIM_") {
            continue;
        }
        let Some(rest) = name.strip_prefix(prefix) else {
            return Err(format!(
                "{source}: {name} is not a setting of this binary (its variables start with {prefix})"
            ));
        };
        let path: Vec<String> = rest
            .split(cim_common::config::ENV_NESTING)
            .map(str::to_lowercase)
            .collect();
        // The field must exist in the binary's configuration (its defaults name every field).
        let mut at = &defaults;
        for (depth, key) in path.iter().enumerate() {
            let Some(next) = at.as_object().and_then(|o| o.get(key)) else {
                return Err(format!(
                    "{source}: {name}: no setting {:?} in the configuration",
                    path[..=depth].join(".")
                ));
            };
            at = next;
        }
        let mut table = &mut layer;
        for key in &path[..path.len() - 1] {
            table = table
                .entry(key.clone())
                .or_insert_with(|| Json::Object(Map::new()))
                .as_object_mut()
                .ok_or_else(|| {
                    format!("{source}: {name}: {key} is set as a value and a section")
                })?;
        }
        table.insert(path[path.len() - 1].clone(), env_value(raw));
    }
    let layer = Json::Object(layer);
    const UNSET: &str = "CIM_DEPLOY_FILES_TEST_UNSET_";
    let fail = |e: &dyn std::fmt::Display| format!("{source}: settings do not load: {e}");
    Ok(match kind {
        Kind::Server => {
            let c: ServerConfig =
                cim_common::config::load(None, UNSET, &layer).map_err(|e| fail(&e))?;
            c.validate().map_err(|e| fail(&e))?;
            Loaded::Server(Box::new(c))
        }
        Kind::Route => {
            let c: RouteConfig =
                cim_common::config::load(None, UNSET, &layer).map_err(|e| fail(&e))?;
            c.validate().map_err(|e| fail(&e))?;
            Loaded::Route(Box::new(c))
        }
        Kind::Standalone => {
            let c: StandaloneConfig =
                cim_common::config::load(None, UNSET, &layer).map_err(|e| fail(&e))?;
            c.resolve().map_err(|e| fail(&e))?;
            Loaded::Standalone(Box::new(c))
        }
    })
}

/// Which listener of a process a path or port is used on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Listener {
    /// Route: `http_listen`.
    Http,
    /// `internal_listen` of a server or route.
    Internal,
}

/// A path some file expects a process to serve.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct PathUse {
    kind: Kind,
    listener: Listener,
    path: String,
    source: String,
}

// ---------------------------------------------------------------------------------------------
// Compose

/// Compose interpolation: `${VAR:-default}`, `${VAR-default}`, `${VAR:?msg}`, `${VAR}`, `$$`.
/// Variables the test sets: [`COMPOSE_REQUIRED`]; every other one takes its default.
fn compose_interpolate(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(body) = rest.strip_prefix("${") else {
            return Err(format!("{s:?}: write $VAR as ${{VAR}} or $$ for a dollar"));
        };
        let end = body
            .find('}')
            .ok_or_else(|| format!("{s:?}: unclosed ${{"))?;
        let expr = &body[..end];
        rest = &body[end + 1..];
        let name_end = expr
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expr.len());
        let (name, op) = expr.split_at(name_end);
        let given = COMPOSE_REQUIRED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string());
        let value = match (given, op) {
            (Some(v), _) => v,
            (None, op) if op.starts_with(":-") => op[2..].to_string(),
            (None, op) if op.starts_with('-') => op[1..].to_string(),
            (None, _) => {
                return Err(format!(
                "{s:?}: ${{{name}}} has no default (add it to COMPOSE_REQUIRED if it is required)"
            ))
            }
        };
        out.push_str(&value);
    }
    out.push_str(rest);
    Ok(out)
}

/// `10s`, `1m30s`, `500ms` → milliseconds.
fn compose_duration_ms(s: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().unwrap_or_else(|_| panic!("duration {s:?}"));
        number.clear();
        total += match c {
            'h' => n * 3_600_000,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                n
            }
            'm' => n * 60_000,
            's' => n * 1000,
            _ => panic!("duration {s:?}"),
        };
    }
    assert!(number.is_empty(), "duration {s:?} needs a unit");
    total
}

fn string_list(value: &Json) -> Vec<String> {
    match value {
        Json::Array(items) => items
            .iter()
            .map(|v| match v {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Json::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Json::Null => Vec::new(),
        other => panic!("not a list: {other}"),
    }
}

/// A compose service's environment (map or `K=V` list), raw (not interpolated).
fn compose_env(service: &Json) -> BTreeMap<String, String> {
    match &service["environment"] {
        Json::Object(map) => map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Json::String(s) => s.clone(),
                    Json::Null => String::new(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect(),
        Json::Array(items) => items
            .iter()
            .filter_map(|i| i.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// `(host port, container port)` of a compose `ports:` entry (`H:C`, `IP:H:C`, `C`).
fn compose_port(entry: &str) -> (Option<u16>, u16) {
    let entry = entry.split('/').next().unwrap();
    let parts: Vec<&str> = entry.rsplitn(3, ':').collect();
    let container = parts[0].parse().expect("container port");
    let host = parts.get(1).map(|h| h.parse().expect("host port"));
    (host, container)
}

/// The `(port, path)` an HTTP healthcheck of the form used in compose.yaml asks (bash
/// `/dev/tcp/127.0.0.1/PORT`, `GET PATH HTTP/1.0`).
fn healthcheck_request(test: &[String]) -> Option<(u16, String)> {
    let script = test.join(" ");
    let port = script
        .split("/dev/tcp/127.0.0.1/")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let path = script.split("GET ").nth(1)?.split_whitespace().next()?;
    Some((port, path.to_string()))
}

struct Compose {
    dir: PathBuf,
    services: Map<String, Json>,
    /// cim services: name → (binary, loaded settings).
    cim: BTreeMap<String, (String, Loaded)>,
}

impl Compose {
    fn load(problems: &mut Problems) -> Compose {
        let path = repo().join("deploy/compose/compose.yaml");
        let doc = yaml(&path);
        let services = doc["services"]
            .as_object()
            .expect("compose.yaml: services")
            .clone();
        let dockerfile_cmd = dockerfile().cmd;
        let mut cim = BTreeMap::new();
        for (name, service) in &services {
            let image = service["image"].as_str().unwrap_or("");
            let builds_here = service["build"]["context"].as_str() == Some("../..");
            if !(builds_here || image.contains("CIM_IMAGE")) {
                continue;
            }
            let command = string_list(&service["command"]);
            let binary = command
                .first()
                .cloned()
                .unwrap_or(dockerfile_cmd[0].clone());
            let Some(kind) = Kind::of(&binary) else {
                continue;
            };
            let mut env = BTreeMap::new();
            for (k, v) in compose_env(service) {
                match compose_interpolate(&v) {
                    Ok(v) => {
                        env.insert(k, v);
                    }
                    Err(e) => problems.add(format!("compose.yaml {name}: {k}: {e}")),
                }
            }
            match load_env(kind, &env, &format!("compose.yaml {name}")) {
                Ok(loaded) => {
                    cim.insert(name.clone(), (binary, loaded));
                }
                Err(e) => problems.add(e),
            }
        }
        Compose {
            dir: path.parent().unwrap().to_path_buf(),
            services,
            cim,
        }
    }

    fn kind_of(&self, service: &str) -> Option<Kind> {
        self.cim.get(service).and_then(|(b, _)| Kind::of(b))
    }

    fn of_kind(&self, kind: Kind) -> impl Iterator<Item = (&String, &Loaded)> {
        self.cim
            .iter()
            .filter(move |(_, (b, _))| Kind::of(b) == Some(kind))
            .map(|(n, (_, l))| (n, l))
    }

    fn image_of(&self, service: &str) -> &str {
        self.services[service]["image"].as_str().unwrap_or("")
    }

    /// Bind mounts `SOURCE:TARGET[:ro]` of a service, the source resolved from compose.yaml's dir.
    fn mounts(&self, service: &str) -> Vec<(PathBuf, String)> {
        string_list(&self.services[service]["volumes"])
            .iter()
            .filter(|v| v.starts_with('.') || v.starts_with('/'))
            .map(|v| {
                let mut parts = v.split(':');
                let source = self.dir.join(parts.next().unwrap());
                (source, parts.next().unwrap_or("").to_string())
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

struct Dockerfile {
    text: String,
    /// `ARG NAME=value` lines.
    args: BTreeMap<String, String>,
    /// `FROM` lines, in order.
    from: Vec<String>,
    /// `ENV` settings of the final stage.
    env: BTreeMap<String, String>,
    user: String,
    cmd: Vec<String>,
    expose: Vec<u16>,
}

fn dockerfile() -> Dockerfile {
    let text = read(&repo().join("Dockerfile"));
    // Instructions: continuation lines joined, comments dropped.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') && current.is_empty() {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            if !current.is_empty() {
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut file = Dockerfile {
        text: text.clone(),
        args: BTreeMap::new(),
        from: Vec::new(),
        env: BTreeMap::new(),
        user: String::new(),
        cmd: Vec::new(),
        expose: Vec::new(),
    };
    for instruction in instructions {
        let (word, rest) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let rest = rest.trim();
        match word {
            "ARG" => {
                if let Some((k, v)) = rest.split_once('=') {
                    file.args.insert(k.to_string(), v.to_string());
                }
            }
            "FROM" => {
                file.from.push(rest.to_string());
                file.env.clear();
            }
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV NAME=value");
                    file.env.insert(k.to_string(), v.to_string());
                }
            }
            "USER" => file.user = rest.to_string(),
            "CMD" => file.cmd = serde_json::from_str(rest).expect("CMD in exec form"),
            "EXPOSE" => {
                file.expose = rest
                    .split_whitespace()
                    .map(|p| p.split('/').next().unwrap().parse().unwrap())
                    .collect()
            }
            _ => {}
        }
    }
    file
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

struct K8s {
    docs: Vec<(String, Json)>,
    /// cim containers: (workload kind/name, ordinal sample) → (binary, settings, pod template).
    cim: Vec<CimWorkload>,
}

struct CimWorkload {
    source: String,
    workload: Json,
    container: Json,
    binary: String,
    /// The settings of each pod (StatefulSet: per ordinal; Deployment: one sample pod).
    pods: Vec<(String, Loaded)>,
}

impl K8s {
    fn load(problems: &mut Problems) -> K8s {
        let dir = repo().join("deploy/k8s");
        let kustomization = yaml(&dir.join("kustomization.yaml"));
        let resources = string_list(&kustomization["resources"]);
        let mut listed = BTreeSet::new();
        let mut docs = Vec::new();
        for resource in &resources {
            let path = dir.join(resource);
            problems.check(path.is_file(), || {
                format!("kustomization.yaml: resource {resource} does not exist")
            });
            if !path.is_file() {
                continue;
            }
            listed.insert(resource.clone());
            for doc in yaml_docs(&path) {
                docs.push((resource.clone(), doc));
            }
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                problems.check(listed.contains(&name), || {
                    format!("deploy/k8s/{name} is not in kustomization.yaml's resources")
                });
            }
        }
        let mut k8s = K8s {
            docs,
            cim: Vec::new(),
        };
        let images: BTreeSet<String> = kustomization["images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect();
        for (file, doc) in k8s.docs.clone() {
            let kind = doc["kind"].as_str().unwrap_or("");
            if kind != "Deployment" && kind != "StatefulSet" {
                continue;
            }
            let name = doc["metadata"]["name"].as_str().unwrap().to_string();
            let replicas = doc["spec"]["replicas"].as_u64().unwrap_or(1);
            for container in doc["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
            {
                let image = container["image"].as_str().unwrap_or("");
                if !images.contains(image) {
                    continue;
                }
                let command: Vec<String> = string_list(&container["command"]);
                let binary = command
                    .first()
                    .cloned()
                    .unwrap_or_else(|| dockerfile().cmd[0].clone());
                let source = format!("{file} {kind}/{name} container {}", container["name"]);
                let Some(kind_of) = Kind::of(&binary) else {
                    continue;
                };
                let pod_names: Vec<String> = if kind == "StatefulSet" {
                    (0..replicas).map(|i| format!("{name}-{i}")).collect()
                } else {
                    vec![format!("{name}-5d8c9f7b6-x2x9z")]
                };
                let mut pods = Vec::new();
                for pod in pod_names {
                    match k8s.container_env(container, &pod, &source) {
                        Ok(env) => {
                            match load_env(kind_of, &env, &format!("{source} (pod {pod})")) {
                                Ok(loaded) => pods.push((pod, loaded)),
                                Err(e) => problems.add(e),
                            }
                        }
                        Err(e) => problems.add(e),
                    }
                }
                k8s.cim.push(CimWorkload {
                    source,
                    workload: doc.clone(),
                    container: container.clone(),
                    binary,
                    pods,
                });
            }
        }
        k8s
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Json> {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Json> + 'a {
        self.docs
            .iter()
            .map(|(_, d)| d)
            .filter(move |d| d["kind"] == kind)
    }

    /// A container's environment as the kubelet makes it for pod `pod`: `fieldRef`s filled
    /// with sample values, `secretKeyRef`s from the Secret manifests, `$(VAR)` expanded.
    fn container_env(
        &self,
        container: &Json,
        pod: &str,
        source: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut env = BTreeMap::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_string();
            let value = if let Some(value) = var["value"].as_str() {
                expand_k8s(value, &env)
            } else if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "metadata.name" => pod.to_string(),
                    "status.podIP" => SAMPLE_POD_IP.to_string(),
                    "metadata.namespace" => "cim".to_string(),
                    other => {
                        return Err(format!("{source}: {name}: fieldRef {other} not known here"))
                    }
                }
            } else if var["valueFrom"]["secretKeyRef"].is_object() {
                let reference = &var["valueFrom"]["secretKeyRef"];
                let secret = reference["name"].as_str().unwrap();
                let key = reference["key"].as_str().unwrap();
                let optional = reference["optional"].as_bool().unwrap_or(false);
                match self.secret_value(secret, key) {
                    Some(value) => value,
                    None if optional => continue,
                    None => {
                        return Err(format!("{source}: {name}: no key {key} in Secret {secret}"))
                    }
                }
            } else {
                return Err(format!("{source}: {name}: no value this test understands"));
            };
            env.insert(name, value);
        }
        Ok(env)
    }

    fn secret_value(&self, secret: &str, key: &str) -> Option<String> {
        let doc = self.find("Secret", secret)?;
        doc["stringData"][key].as_str().map(str::to_string)
    }

    /// The number a port (name or number) of a container means.
    fn container_port(container: &Json, port: &Json) -> Option<u64> {
        if let Some(n) = port.as_u64() {
            return Some(n);
        }
        let name = port.as_str()?;
        container["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?["containerPort"]
            .as_u64()
    }

    /// The Services whose selector picks pods with `labels`.
    fn services_selecting<'a>(&'a self, labels: &'a Json) -> impl Iterator<Item = &'a Json> + 'a {
        self.of_kind("Service").filter(move |s| {
            s["spec"]["selector"].as_object().is_some_and(|selector| {
                !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
            })
        })
    }
}

/// Kubernetes' `$(VAR)` expansion of a value against the variables defined before it.
fn expand_k8s(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (name, v) in env {
        out = out.replace(&format!("$({name})"), v);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// nginx

/// `upstream NAME { server HOST:PORT ...; }` blocks of an nginx config: name → `HOST:PORT`s.
fn nginx_upstreams(conf: &str) -> BTreeMap<String, Vec<String>> {
    let mut upstreams = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in conf.lines().map(|l| l.split('#').next().unwrap().trim()) {
        if let Some(rest) = line.strip_prefix("upstream ") {
            current = Some(rest.trim_end_matches('{').trim().to_string());
            upstreams.insert(current.clone().unwrap(), Vec::new());
        } else if line == "}" {
            current = None;
        } else if let (Some(name), Some(rest)) = (&current, line.strip_prefix("server ")) {
            let addr = rest.split([' ', ';']).next().unwrap().to_string();
            upstreams.get_mut(name).unwrap().push(addr);
        }
    }
    upstreams
}

/// The text of the `location` block that starts with `header` (e.g. `location = /ws {`).
fn nginx_blocks<'a>(conf: &'a str, header: &str) -> Vec<&'a str> {
    conf.match_indices(header)
        .map(|(at, _)| {
            let body = &conf[at..];
            &body[..body.find('}').unwrap()]
        })
        .collect()
}

/// `server { listen N; ... }` ports.
fn nginx_listen_ports(conf: &str) -> BTreeSet<u16> {
    conf.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter_map(|l| l.strip_prefix("listen "))
        .map(|rest| {
            let addr = rest.split([' ', ';']).next().unwrap();
            addr.rsplit(':')
                .next()
                .unwrap()
                .parse()
                .expect("listen port")
        })
        .collect()
}

fn nginx_seconds(value: &str) -> u64 {
    let (number, unit) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len()),
    );
    let n: u64 = number.parse().unwrap();
    match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        other => panic!("nginx time unit {other}"),
    }
}

fn nginx_directive<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    block
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim_end_matches(';').trim())
}

// ---------------------------------------------------------------------------------------------
// The checks

#[test]
fn every_yaml_and_json_file_parses() {
    let mut files = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let mut count = 0;
    for path in files {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                let docs = yaml_docs(&path);
                assert!(!docs.is_empty(), "{}: empty", rel(&path));
                if path.starts_with(repo().join("deploy/k8s")) {
                    for doc in &docs {
                        for field in ["apiVersion", "kind"] {
                            assert!(
                                doc[field].is_string(),
                                "{}: a document without {field}",
                                rel(&path)
                            );
                        }
                        if doc["kind"] != "Kustomization" {
                            assert!(
                                doc["metadata"]["name"].is_string(),
                                "{}: a {} without a name",
                                rel(&path),
                                doc["kind"]
                            );
                        }
                    }
                }
                count += 1;
            }
            Some("json") => {
                serde_json::from_str::<Json>(&read(&path))
                    .unwrap_or_else(|e| panic!("{}: not JSON: {e}", rel(&path)));
                count += 1;
            }
            _ => {}
        }
    }
    assert!(
        count >= 10,
        "only {count} YAML/JSON files found under deploy/"
    );
}

#[test]
fn the_image_holds_every_binary_and_runs_standalone() {
    let file = dockerfile();
    let mut problems = Problems::default();
    let workspace_bins: BTreeSet<&str> = binaries().keys().map(String::as_str).collect();

    // Builder: the workspace's toolchain on bookworm, protoc and the well-known protos.
    let manifest: toml::Value = toml::from_str(&read(&repo().join("Cargo.toml"))).unwrap();
    let rust_version = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    let image_version = file.args.get("RUST_VERSION").expect("ARG RUST_VERSION");
    problems.check(version(image_version) >= version(rust_version), || {
        format!("Dockerfile: RUST_VERSION {image_version} is older than the workspace's rust-version {rust_version}")
    });
    problems.check(
        file.from
            .first()
            .is_some_and(|f| f == "rust:${RUST_VERSION}-bookworm AS builder"),
        || {
            format!(
                "Dockerfile: first stage should be rust on bookworm, is {:?}",
                file.from.first()
            )
        },
    );
    for package in ["protobuf-compiler", "libprotobuf-dev"] {
        problems.check(file.text.contains(package), || {
            format!("Dockerfile: {package} not installed")
        });
    }
    problems.check(file.text.contains("cargo build --release --locked"), || {
        "Dockerfile: no `cargo build --release --locked`".into()
    });
    problems.check(
        file.from
            .last()
            .is_some_and(|f| f == "debian:bookworm-slim"),
        || {
            format!(
                "Dockerfile: runtime stage should be debian:bookworm-slim, is {:?}",
                file.from.last()
            )
        },
    );

    // Every binary of the workspace is built, copied out and into the image; nothing else.
    let copied_out: BTreeSet<&str> = file
        .text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("target/release/"))
        .collect();
    let copied_in: BTreeSet<&str> = file
        .text
        .lines()
        .filter(|l| l.starts_with("COPY --from=builder"))
        .flat_map(str::split_whitespace)
        .filter_map(|w| w.strip_prefix("/out/"))
        .collect();
    problems.check(copied_out == workspace_bins, || {
        format!("Dockerfile: copies {copied_out:?} out of target/release, the workspace's binaries are {workspace_bins:?}")
    });
    problems.check(copied_in == workspace_bins, || {
        format!("Dockerfile: puts {copied_in:?} into the image, the workspace's binaries are {workspace_bins:?}")
    });

    // Non-root, with the uid the Kubernetes manifests name.
    let uid = file.user.split(':').next().unwrap_or("");
    problems.check(uid.parse::<u32>().is_ok_and(|u| u != 0), || {
        format!(
            "Dockerfile: USER {:?} should be a numeric non-root uid",
            file.user
        )
    });
    let mut problems_k8s = Problems::default();
    let k8s = K8s::load(&mut problems_k8s);
    for workload in &k8s.cim {
        let run_as = &workload.workload["spec"]["template"]["spec"]["securityContext"]["runAsUser"];
        problems.check(run_as.as_u64() == uid.parse::<u64>().ok(), || {
            format!(
                "{}: runAsUser {run_as} is not the image's USER {uid}",
                workload.source
            )
        });
    }

    // The default command: standalone mode, bound to 0.0.0.0, the ports it exposes.
    problems.check(
        file.cmd.first().map(String::as_str) == Some("cim-standalone"),
        || format!("Dockerfile: CMD {:?} should run cim-standalone", file.cmd),
    );
    match load_env(Kind::Standalone, &file.env, "Dockerfile ENV") {
        Ok(Loaded::Standalone(config)) => {
            let listens = [&config.http_listen, &config.tcp_listen, &config.ws_listen];
            for listen in listens {
                problems.check(host_of(listen) == "0.0.0.0", || {
                    format!("Dockerfile: standalone listens on {listen}, not on every interface")
                });
            }
            let ports: BTreeSet<u16> = listens.iter().map(|l| port_of(l)).collect();
            let exposed: BTreeSet<u16> = file.expose.iter().copied().collect();
            problems.check(ports == exposed, || {
                format!("Dockerfile: EXPOSE {exposed:?}, standalone listens on {ports:?}")
            });
        }
        Ok(_) => unreachable!(),
        Err(e) => problems.add(e),
    }

    let ignored = read(&repo().join(".dockerignore"));
    for entry in ["target/", "run/", ".git/", "node_modules/"] {
        problems.check(
            ignored
                .lines()
                .any(|l| l.trim().trim_start_matches("**/") == entry),
            || format!(".dockerignore: {entry} missing"),
        );
    }
    problems.assert_none("Dockerfile");
}

#[test]
fn every_command_and_flag_exists() {
    let mut invocations = Vec::new();
    let file = dockerfile();
    invocations.push(Invocation {
        binary: file.cmd[0].clone(),
        args: file.cmd[1..].to_vec(),
        source: "Dockerfile CMD".into(),
    });
    invocations.extend(invocations_in_text(&file.text, "Dockerfile comments"));

    let compose_path = repo().join("deploy/compose/compose.yaml");
    invocations.extend(invocations_in_text(
        &read(&compose_path),
        "compose.yaml comments",
    ));
    let compose = yaml(&compose_path);
    for (name, service) in compose["services"].as_object().unwrap() {
        let command = string_list(&service["command"]);
        if let Some((binary, args)) = command.split_first() {
            if binaries().contains_key(binary) {
                invocations.push(Invocation {
                    binary: binary.clone(),
                    args: args.to_vec(),
                    source: format!("compose.yaml {name}"),
                });
            }
        }
    }
    let k8s = K8s::load(&mut Problems::default());
    for workload in &k8s.cim {
        let mut command = string_list(&workload.container["command"]);
        command.extend(string_list(&workload.container["args"]));
        invocations.push(Invocation {
            binary: command[0].clone(),
            args: command[1..].to_vec(),
            source: workload.source.clone(),
        });
    }
    let readme = read(&repo().join("README.md"));
    invocations.extend(invocations_in_text(
        &markdown_code(&readme, "## Deploying"),
        "README.md, Deploying",
    ));
    invocations.extend(invocations_in_text(
        &markdown_code(&read(&repo().join("deploy/k8s/README.md")), ""),
        "deploy/k8s/README.md",
    ));

    let mut problems = Problems::default();
    let mut flags_checked = 0;
    for invocation in &invocations {
        let Some(_) = binaries().get(&invocation.binary) else {
            problems.add(format!(
                "{}: no binary {}",
                invocation.source, invocation.binary
            ));
            continue;
        };
        let top = help(&invocation.binary, None);
        let subs = subcommands(&invocation.binary);
        for flag in invocation.flags() {
            let known = help_lists(&top, flag)
                || subs.iter().any(|sub| {
                    invocation.args.contains(sub)
                        && help_lists(&help(&invocation.binary, Some(sub)), flag)
                });
            problems.check(known, || {
                format!(
                    "{}: {} has no flag {flag} (see {} --help)",
                    invocation.source, invocation.binary, invocation.binary
                )
            });
            flags_checked += 1;
        }
    }
    problems.assert_none("commands and flags");
    let binaries_used: BTreeSet<&str> = invocations.iter().map(|i| i.binary.as_str()).collect();
    for binary in ["cim-server", "cim-route", "cim-standalone", "cim-client"] {
        assert!(
            binaries_used.contains(binary),
            "no file runs {binary}: {invocations:#?}"
        );
    }
    assert!(
        flags_checked > 0,
        "no flag found to check: {invocations:#?}"
    );
}

#[test]
fn compose_settings_ports_and_names_agree() {
    let mut problems = Problems::default();
    let compose = Compose::load(&mut problems);
    let raw = read(&compose.dir.join("compose.yaml"));

    let servers: Vec<_> = compose.of_kind(Kind::Server).collect();
    let routes: Vec<_> = compose.of_kind(Kind::Route).collect();
    problems.check(servers.len() >= 2 && routes.len() >= 2, || {
        format!(
            "compose.yaml: {} servers and {} routes, two of each expected",
            servers.len(),
            routes.len()
        )
    });

    // Backends: the etcd and Redis services, at their ports; Redis with the AOF.
    let by_image = |prefix: &str| -> Option<String> {
        compose
            .services
            .keys()
            .find(|name| compose.image_of(name).starts_with(prefix))
            .cloned()
    };
    let redis = by_image("redis:").expect("compose.yaml: a redis service");
    let etcd = by_image("quay.io/coreos/etcd").expect("compose.yaml: an etcd service");
    let redis_command = string_list(&compose.services[&redis]["command"]);
    problems.check(
        redis_command
            .windows(2)
            .any(|w| w[0] == "--appendonly" && w[1] == "yes"),
        || "compose.yaml: redis runs without --appendonly yes".into(),
    );
    let etcd_command = string_list(&compose.services[&etcd]["command"]);
    let etcd_port = etcd_command
        .iter()
        .find_map(|a| a.strip_prefix("--listen-client-urls="))
        .map(|u| port_of(url_authority(u)))
        .expect("compose.yaml: etcd --listen-client-urls=");
    for (name, (_, loaded)) in &compose.cim {
        let backend = loaded.backend();
        problems.check(
            url_authority(&backend.redis_url) == format!("{redis}:6379"),
            || {
                format!(
                    "compose.yaml {name}: redis_url {} is not the {redis} service",
                    backend.redis_url
                )
            },
        );
        for endpoint in &backend.etcd_endpoints {
            problems.check(
                url_authority(endpoint) == format!("{etcd}:{etcd_port}"),
                || {
                    format!(
                        "compose.yaml {name}: etcd endpoint {endpoint} is not the {etcd} service"
                    )
                },
            );
        }
    }

    // Published host ports are all distinct.
    let mut host_ports = BTreeMap::new();
    for (name, service) in &compose.services {
        for entry in string_list(&service["ports"]) {
            if let (Some(host), _) = compose_port(&entry) {
                if let Some(other) = host_ports.insert(host, name.clone()) {
                    problems.add(format!(
                        "compose.yaml: host port {host} published by {other} and {name}"
                    ));
                }
            }
        }
    }

    let published = |service: &str, container: u16| -> Vec<u16> {
        string_list(&compose.services[service]["ports"])
            .iter()
            .map(|e| compose_port(e))
            .filter(|(_, c)| *c == container)
            .filter_map(|(h, _)| h)
            .collect()
    };
    let health = |service: &str| -> Option<(u16, String)> {
        healthcheck_request(&string_list(
            &compose.services[service]["healthcheck"]["test"],
        ))
    };
    let grace_ms = |service: &str| -> u64 {
        compose.services[service]["stop_grace_period"]
            .as_str()
            .map_or(10_000, compose_duration_ms)
    };
    let public_host = compose_interpolate("${CIM_PUBLIC_HOST:-127.0.0.1}").unwrap();

    for (name, loaded) in &servers {
        let c = loaded.server();
        for (field, listen) in [
            ("tcp_listen", &c.tcp_listen),
            ("ws_listen", &c.ws_listen),
            ("internal_listen", &c.internal_listen),
        ] {
            problems.check(host_of(listen) == "0.0.0.0", || {
                format!(
                    "compose.yaml {name}: {field} {listen} is not reachable from other containers"
                )
            });
        }
        // Clients outside the compose network: the published host port, at CIM_PUBLIC_HOST.
        for (field, listen, advertised) in [
            ("advertise_tcp", &c.tcp_listen, &c.advertise_tcp),
            ("advertise_ws", &c.ws_listen, &c.advertise_ws),
        ] {
            let host_side = published(name, port_of(listen));
            match advertised {
                Some(addr) => {
                    problems.check(host_side.contains(&port_of(addr)), || {
                        format!("compose.yaml {name}: {field} {addr} is not a host port published for {listen} ({host_side:?})")
                    });
                    problems.check(host_of(addr) == public_host, || {
                        format!("compose.yaml {name}: {field} {addr} is not at CIM_PUBLIC_HOST")
                    });
                }
                None => problems.add(format!("compose.yaml {name}: {field} unset: clients would get the container's own address")),
            }
        }
        let env = compose_env(&compose.services[name.as_str()]);
        for var in ["CIM_SERVER_ADVERTISE_TCP", "CIM_SERVER_ADVERTISE_WS"] {
            problems.check(
                env.get(var)
                    .is_some_and(|v| v.contains("${CIM_PUBLIC_HOST:-127.0.0.1}")),
                || format!("compose.yaml {name}: {var} should use ${{CIM_PUBLIC_HOST:-127.0.0.1}}"),
            );
        }
        // Routes call the internal listener by the service name; it is not published.
        let internal = port_of(&c.internal_listen);
        let advertised_internal = c.advertise_internal.clone().unwrap_or_else(|| {
            format!(
                "{}:{internal}",
                c.advertise_host.as_deref().unwrap_or("127.0.0.1")
            )
        });
        problems.check(advertised_internal == format!("{name}:{internal}"), || {
            format!("compose.yaml {name}: advertises its internal API at {advertised_internal}, not {name}:{internal}")
        });
        problems.check(published(name, internal).is_empty(), || {
            format!("compose.yaml {name}: the internal listener is published on the host")
        });
        problems.check(health(name).is_some_and(|(p, _)| p == internal), || {
            format!(
                "compose.yaml {name}: healthcheck {:?} is not on the internal listener {internal}",
                health(name)
            )
        });
        let drain = c.shutdown_grace_ms + c.backend.timeout_ms;
        problems.check(grace_ms(name) > drain, || {
            format!("compose.yaml {name}: stop_grace_period {} ms does not outlast the drain ({drain} ms)", grace_ms(name))
        });
    }
    for (name, loaded) in &routes {
        let c = loaded.route();
        for (field, listen) in [
            ("http_listen", &c.http_listen),
            ("internal_listen", &c.internal_listen),
        ] {
            problems.check(host_of(listen) == "0.0.0.0", || {
                format!(
                    "compose.yaml {name}: {field} {listen} is not reachable from other containers"
                )
            });
        }
        let internal = c.advertised(
            c.advertise_internal.as_deref(),
            c.internal_listen_addr().unwrap(),
        );
        problems.check(
            internal == format!("{name}:{}", port_of(&c.internal_listen)),
            || format!("compose.yaml {name}: advertises its internal API at {internal}"),
        );
        let http = port_of(&c.http_listen);
        problems.check(health(name).is_some_and(|(p, _)| p == http), || {
            format!(
                "compose.yaml {name}: healthcheck {:?} is not on the HTTP listener {http}",
                health(name)
            )
        });
        let drain = c.request_timeout_ms + 1000 + c.backend.timeout_ms;
        problems.check(grace_ms(name) > drain, || {
            format!("compose.yaml {name}: stop_grace_period {} ms does not outlast the drain ({drain} ms)", grace_ms(name))
        });
    }
    problems.check(raw.contains("${CIM_CLUSTER_SECRET:?"), || {
        "compose.yaml: the cluster secret should be required (${CIM_CLUSTER_SECRET:?...})".into()
    });

    // nginx: the mounted file is deploy/nginx/cim.conf, its upstreams are these services.
    let nginx = by_image("nginx:").expect("compose.yaml: an nginx service");
    let mounts = compose.mounts(&nginx);
    let conf_path = repo().join("deploy/nginx/cim.conf");
    problems.check(
        mounts.iter().any(|(source, target)| {
            source.canonicalize().ok() == conf_path.canonicalize().ok()
                && target.starts_with("/etc/nginx/conf.d/")
                && target.ends_with(".conf")
        }),
        || format!("compose.yaml {nginx}: deploy/nginx/cim.conf is not mounted into /etc/nginx/conf.d/ ({mounts:?})"),
    );
    let conf = read(&conf_path);
    let upstreams = nginx_upstreams(&conf);
    let route_names: BTreeSet<String> = routes.iter().map(|(n, _)| n.to_string()).collect();
    let mut balanced = BTreeSet::new();
    for (upstream, members) in &upstreams {
        for member in members {
            let host = host_of(member);
            let port = port_of(member);
            match compose.kind_of(host) {
                Some(Kind::Route) => {
                    let c = compose.cim[host].1.route();
                    problems.check(port == port_of(&c.http_listen), || {
                        format!("cim.conf upstream {upstream}: {member} is not {host}'s HTTP listener ({})", c.http_listen)
                    });
                    balanced.insert(host.to_string());
                }
                Some(Kind::Server) => {
                    let c = compose.cim[host].1.server();
                    problems.check(port == port_of(&c.ws_listen), || {
                        format!("cim.conf upstream {upstream}: {member} is not {host}'s WebSocket listener ({})", c.ws_listen)
                    });
                }
                _ => problems.add(format!(
                    "cim.conf upstream {upstream}: {member} is no cim service of compose.yaml"
                )),
            }
        }
    }
    problems.check(balanced == route_names, || {
        format!(
            "cim.conf: the routes behind nginx are {balanced:?}, compose.yaml runs {route_names:?}"
        )
    });
    let listens = nginx_listen_ports(&conf);
    for entry in string_list(&compose.services[&nginx]["ports"]) {
        let (_, container) = compose_port(&entry);
        problems.check(listens.contains(&container), || {
            format!("compose.yaml {nginx}: publishes {container}, which cim.conf does not listen on ({listens:?})")
        });
    }

    // Prometheus: the mounted config scrapes every server and route at its internal listener.
    let prometheus = by_image("prom/prometheus").expect("compose.yaml: a prometheus service");
    let config_path = repo().join("deploy/prometheus/prometheus.yml");
    problems.check(
        compose.mounts(&prometheus).iter().any(|(s, t)| {
            s.canonicalize().ok() == config_path.canonicalize().ok()
                && t == "/etc/prometheus/prometheus.yml"
        }),
        || format!("compose.yaml {prometheus}: deploy/prometheus/prometheus.yml is not its config"),
    );
    let config = yaml(&config_path);
    for (job, kind) in JOBS {
        let Some(scrape) = config["scrape_configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["job_name"] == job)
        else {
            problems.add(format!("prometheus.yml: no job {job}"));
            continue;
        };
        let targets: BTreeSet<String> = scrape["static_configs"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| string_list(&s["targets"]))
            .collect();
        let expected: BTreeSet<String> = compose
            .of_kind(kind)
            .map(|(name, loaded)| {
                let internal = match loaded {
                    Loaded::Server(c) => &c.internal_listen,
                    Loaded::Route(c) => &c.internal_listen,
                    Loaded::Standalone(_) => unreachable!(),
                };
                format!("{name}:{}", port_of(internal))
            })
            .collect();
        problems.check(targets == expected, || {
            format!("prometheus.yml job {job}: targets {targets:?}, the internal listeners are {expected:?}")
        });
    }
    problems.assert_none("compose");
}

#[test]
fn k8s_settings_ports_and_names_agree() {
    let mut problems = Problems::default();
    let k8s = K8s::load(&mut problems);
    let dir = repo().join("deploy/k8s");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    let namespace = kustomization["namespace"]
        .as_str()
        .expect("kustomization.yaml: namespace");
    problems.check(k8s.find("Namespace", namespace).is_some(), || {
        format!("no Namespace {namespace} among the resources")
    });

    let mut kinds = BTreeSet::new();
    for workload in &k8s.cim {
        let kind = Kind::of(&workload.binary).unwrap();
        kinds.insert(kind);
        let source = &workload.source;
        let spec = &workload.workload["spec"]["template"]["spec"];
        let labels = &workload.workload["spec"]["template"]["metadata"]["labels"];
        let annotations = &workload.workload["spec"]["template"]["metadata"]["annotations"];
        let container = &workload.container;
        let Some((_, first)) = workload.pods.first() else {
            continue;
        };
        // Listener name (as the container's port names say) → bound port.
        let listeners: Vec<(&str, u16)> = match first {
            Loaded::Server(c) => vec![
                ("tcp", port_of(&c.tcp_listen)),
                ("ws", port_of(&c.ws_listen)),
                ("internal", port_of(&c.internal_listen)),
            ],
            Loaded::Route(c) => vec![
                ("http", port_of(&c.http_listen)),
                ("internal", port_of(&c.internal_listen)),
            ],
            Loaded::Standalone(_) => vec![],
        };
        for (name, port) in &listeners {
            let declared = K8s::container_port(container, &Json::String(name.to_string()));
            problems.check(declared == Some(u64::from(*port)), || {
                format!(
                    "{source}: container port {name} is {declared:?}, the listener binds {port}"
                )
            });
        }
        let internal_port = listeners.iter().find(|(n, _)| *n == "internal").unwrap().1;
        let probe_port = match kind {
            Kind::Server => internal_port,
            _ => listeners.iter().find(|(n, _)| *n == "http").unwrap().1,
        };
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &container[probe]["httpGet"];
            let port = K8s::container_port(container, &get["port"]);
            problems.check(port == Some(u64::from(probe_port)), || {
                format!("{source}: {probe} on port {port:?}, /healthz is served on {probe_port}")
            });
            problems.check(get["path"] == "/healthz", || {
                format!("{source}: {probe} path {}", get["path"])
            });
        }
        // Prometheus annotations: the internal listener.
        problems.check(annotations["prometheus.io/scrape"] == "true", || {
            format!("{source}: not annotated for Prometheus")
        });
        problems.check(
            annotations["prometheus.io/port"]
                .as_str()
                .and_then(|p| p.parse::<u16>().ok())
                == Some(internal_port),
            || {
                format!(
                    "{source}: prometheus.io/port {} is not the internal listener {internal_port}",
                    annotations["prometheus.io/port"]
                )
            },
        );
        problems.check(annotations["prometheus.io/path"] == "/metrics", || {
            format!(
                "{source}: prometheus.io/path {}",
                annotations["prometheus.io/path"]
            )
        });
        // The job name the dashboard expects, from the pod label.
        let job = labels["app.kubernetes.io/name"].as_str().unwrap_or("");
        problems.check(JOBS.iter().any(|(j, k)| *j == job && *k == kind), || {
            format!(
                "{source}: app.kubernetes.io/name {job:?} is not the Prometheus job of a {kind:?}"
            )
        });
        // Grace period.
        let grace_ms = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30) * 1000;
        let pre_stop = string_list(&container["lifecycle"]["preStop"]["exec"]["command"]);
        let pre_stop_ms = match pre_stop.as_slice() {
            [sleep, secs] if sleep == "sleep" => secs.parse::<u64>().unwrap() * 1000,
            [] => 0,
            other => panic!("{source}: preStop {other:?}"),
        };
        let drain = pre_stop_ms
            + match first {
                Loaded::Server(c) => c.shutdown_grace_ms + c.backend.timeout_ms,
                Loaded::Route(c) => c.request_timeout_ms + 1000 + c.backend.timeout_ms,
                Loaded::Standalone(_) => 0,
            };
        problems.check(grace_ms > drain, || {
            format!("{source}: terminationGracePeriodSeconds {} s does not outlast the drain ({drain} ms)", grace_ms / 1000)
        });
        // Resources.
        for resource in ["cpu", "memory"] {
            problems.check(
                container["resources"]["requests"][resource].is_string(),
                || format!("{source}: no {resource} request"),
            );
        }
        problems.check(spec["securityContext"]["runAsNonRoot"] == true, || {
            format!("{source}: runAsNonRoot unset")
        });

        for (pod, loaded) in &workload.pods {
            let source = format!("{source} (pod {pod})");
            // Backends: Services in front of the etcd / Redis pods.
            let backend = loaded.backend();
            for url in std::iter::once(&backend.redis_url).chain(&backend.etcd_endpoints) {
                let authority = url_authority(url);
                let (host, port) = (host_of(authority), port_of(authority));
                let service = k8s.find("Service", host);
                problems.check(
                    service.is_some_and(|s| {
                        s["spec"]["ports"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["port"] == port)
                    }),
                    || format!("{source}: {url} is no Service port"),
                );
            }
            let (advertise_host, listens): (Option<&String>, Vec<&String>) = match loaded {
                Loaded::Server(c) => (
                    c.advertise_host.as_ref(),
                    vec![&c.tcp_listen, &c.ws_listen, &c.internal_listen],
                ),
                Loaded::Route(c) => (
                    c.advertise_host.as_ref(),
                    vec![&c.http_listen, &c.internal_listen],
                ),
                Loaded::Standalone(_) => (None, vec![]),
            };
            for listen in listens {
                problems.check(host_of(listen) == "0.0.0.0", || {
                    format!("{source}: {listen} is not reachable from other pods")
                });
            }
            problems.check(advertise_host.is_some_and(|h| h == SAMPLE_POD_IP), || {
                format!("{source}: advertise_host {advertise_host:?} should be the pod IP")
            });
            if let Loaded::Server(c) = loaded {
                // This pod's own Service carries the advertised client ports, at the name
                // external-dns gives it.
                let pod_labels = serde_json::json!({ "statefulset.kubernetes.io/pod-name": pod });
                let own: Vec<&Json> = k8s.services_selecting(&pod_labels).collect();
                if own.len() != 1 {
                    problems.add(format!(
                        "{source}: {} Services select this pod alone, one expected",
                        own.len()
                    ));
                    continue;
                }
                let service = own[0];
                for (field, listen, advertised) in [
                    ("advertise_tcp", &c.tcp_listen, &c.advertise_tcp),
                    ("advertise_ws", &c.ws_listen, &c.advertise_ws),
                ] {
                    let Some(advertised) = advertised else {
                        problems.add(format!("{source}: {field} unset"));
                        continue;
                    };
                    let serves = service["spec"]["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| {
                            p["port"] == port_of(advertised)
                                && K8s::container_port(container, &p["targetPort"])
                                    == Some(u64::from(port_of(listen)))
                        });
                    problems.check(serves, || {
                        format!(
                            "{source}: {field} {advertised}: Service {} has no port {} to {listen}",
                            service["metadata"]["name"],
                            port_of(advertised)
                        )
                    });
                    let dns = &service["metadata"]["annotations"]
                        ["external-dns.alpha.kubernetes.io/hostname"];
                    problems.check(dns == host_of(advertised), || {
                        format!("{source}: {field} host {} is not the external-dns name {dns} of its Service", host_of(advertised))
                    });
                }
            }
        }
        // Services in front of the pods target ports that exist.
        for service in k8s.services_selecting(labels) {
            for port in service["spec"]["ports"].as_array().unwrap() {
                problems.check(
                    K8s::container_port(container, &port["targetPort"]).is_some(),
                    || {
                        format!(
                            "Service {}: targetPort {} is no port of {source}",
                            service["metadata"]["name"], port["targetPort"]
                        )
                    },
                );
            }
        }
        if kind == Kind::Route {
            let http = listeners[0].1;
            problems.check(
                k8s.services_selecting(labels).any(|s| {
                    s["spec"]["ports"].as_array().unwrap().iter().any(|p| {
                        K8s::container_port(container, &p["targetPort"]) == Some(u64::from(http))
                    })
                }),
                || format!("{source}: no Service in front of the HTTP listener"),
            );
        }
        if workload.workload["kind"] == "StatefulSet" {
            let governing = workload.workload["spec"]["serviceName"]
                .as_str()
                .unwrap_or("");
            problems.check(
                k8s.find("Service", governing)
                    .is_some_and(|s| s["spec"]["clusterIP"] == "None"),
                || format!("{source}: serviceName {governing:?} is no headless Service"),
            );
        }
    }
    problems.check(
        kinds.contains(&Kind::Server) && kinds.contains(&Kind::Route),
        || format!("k8s: servers and routes expected, found {kinds:?}"),
    );
    problems.check(
        k8s.cim.iter().any(|w| {
            Kind::of(&w.binary) == Some(Kind::Server) && w.workload["kind"] == "StatefulSet"
        }),
        || "k8s: the servers should be a StatefulSet".into(),
    );
    problems.check(
        k8s.cim.iter().any(|w| {
            Kind::of(&w.binary) == Some(Kind::Route) && w.workload["kind"] == "Deployment"
        }),
        || "k8s: the routes should be a Deployment".into(),
    );

    // etcd and Redis: StatefulSets with volumes; Redis with the AOF.
    for name in ["etcd", "redis"] {
        let Some(set) = k8s.find("StatefulSet", name) else {
            problems.add(format!("k8s: no StatefulSet {name}"));
            continue;
        };
        let claims: Vec<&str> = set["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["metadata"]["name"].as_str())
            .collect();
        let container = &set["spec"]["template"]["spec"]["containers"][0];
        let mounted = container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| claims.contains(&m["name"].as_str().unwrap_or("")));
        problems.check(mounted, || {
            format!("StatefulSet {name}: no volume claim mounted")
        });
        if name == "redis" {
            let command = string_list(&container["command"]);
            problems.check(
                command
                    .windows(2)
                    .any(|w| w[0] == "--appendonly" && w[1] == "yes"),
                || "StatefulSet redis: no --appendonly yes".into(),
            );
        }
    }

    // The example Prometheus config for Kubernetes finds the annotated pods and names the jobs.
    let prometheus = yaml(&repo().join("deploy/prometheus/prometheus-k8s.yml"));
    let text = serde_json::to_string(&prometheus).unwrap();
    for needle in [
        "kubernetes_sd_configs",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
        "__meta_kubernetes_pod_annotation_prometheus_io_port",
        "__meta_kubernetes_pod_annotation_prometheus_io_path",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name",
    ] {
        problems.check(text.contains(needle), || {
            format!("prometheus-k8s.yml: no {needle}")
        });
    }
    let namespaces = string_list(
        &prometheus["scrape_configs"][0]["kubernetes_sd_configs"][0]["namespaces"]["names"],
    );
    problems.check(namespaces == [namespace], || {
        format!("prometheus-k8s.yml: namespaces {namespaces:?}, the manifests use {namespace}")
    });
    problems.assert_none("k8s");
}

/// `nginx -t` on deploy/nginx/cim.conf, with Debian's nginx (deploy/install-deps.sh --tests
/// installs it; `CIM_TEST_NGINX` overrides the path).
///
/// nginx resolves every upstream `server` name when it loads a config, and `nginx -t` fails
/// on a name it cannot resolve; the compose service names only resolve inside the compose
/// network. So the test checks a copy in a temporary directory in which each upstream host
/// is replaced by 127.0.0.1, the rest byte for byte (`nginx -t` connects to no upstream, so
/// the address does not matter). The names themselves are checked against compose.yaml in
/// [`compose_settings_ports_and_names_agree`]. The copy is included in the http {} block of
/// a minimal nginx.conf whose pid, logs and temp paths are all in the temporary directory.
#[test]
fn nginx_config_is_valid() {
    let conf = read(&repo().join("deploy/nginx/cim.conf"));
    let mut problems = Problems::default();

    // What the file must do, beyond being valid.
    let events = nginx_blocks(&conf, "location = /api/admin/events {");
    problems.check(events.len() == 1, || {
        "cim.conf: no `location = /api/admin/events` (SSE)".into()
    });
    for block in &events {
        problems.check(
            nginx_directive(block, "proxy_buffering") == Some("off"),
            || "cim.conf: SSE buffered".into(),
        );
        let timeout = nginx_directive(block, "proxy_read_timeout").map_or(60, nginx_seconds);
        problems.check(timeout >= 3600, || {
            format!("cim.conf: SSE read timeout {timeout} s")
        });
    }
    let upstreams = nginx_upstreams(&conf);
    let websockets = nginx_blocks(&conf, "location = /ws {");
    problems.check(!websockets.is_empty(), || {
        "cim.conf: no WebSocket pass-through".into()
    });
    for block in &websockets {
        for (directive, value) in [
            ("proxy_http_version", "1.1"),
            ("proxy_set_header Upgrade", "$http_upgrade"),
            ("proxy_set_header Connection", "$connection_upgrade"),
        ] {
            problems.check(nginx_directive(block, directive) == Some(value), || {
                format!("cim.conf: a /ws location without `{directive} {value}`")
            });
        }
        let target = nginx_directive(block, "proxy_pass").unwrap_or("");
        let upstream = target.trim_start_matches("http://");
        problems.check(upstreams.contains_key(upstream), || {
            format!("cim.conf: proxy_pass {target} is no upstream")
        });
    }
    problems.check(conf.contains("location / {"), || {
        "cim.conf: no `location /` for the API and the web page".into()
    });
    problems.assert_none("cim.conf");

    let nginx = std::env::var_os("CIM_TEST_NGINX")
        .map_or_else(|| PathBuf::from("/usr/sbin/nginx"), PathBuf::from);
    assert!(
        nginx.is_file(),
        "{} not found: install Debian's nginx (deploy/install-deps.sh --tests, or apt-get install nginx)",
        nginx.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let hosts: BTreeSet<&str> = upstreams.values().flatten().map(|a| host_of(a)).collect();
    let mut copy = String::new();
    let mut in_upstream = false;
    for line in conf.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("upstream ") {
            in_upstream = true;
        } else if trimmed == "}" {
            in_upstream = false;
        }
        let mut line = line.to_string();
        if in_upstream && trimmed.starts_with("server ") {
            for host in &hosts {
                line = line.replace(&format!(" {host}:"), " 127.0.0.1:");
            }
        }
        copy.push_str(&line);
        copy.push('\n');
    }
    let included = dir.path().join("cim.conf");
    std::fs::write(&included, copy).unwrap();
    let d = dir.path().display();
    let main = format!(
        "pid {d}/nginx.pid;\n\
         error_log {d}/error.log;\n\
         events {{}}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         include {};\n\
         }}\n",
        included.display()
    );
    let main_path = dir.path().join("nginx.conf");
    std::fs::write(&main_path, main).unwrap();
    let output = Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(dir.path())
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .arg("-c")
        .arg(&main_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "nginx -t refused deploy/nginx/cim.conf:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_dashboard_uses_only_exported_metrics() {
    let dashboard: Json =
        serde_json::from_str(&read(&repo().join("deploy/grafana/cim-dashboard.json"))).unwrap();
    assert!(
        dashboard["title"].is_string() && dashboard["uid"].is_string(),
        "dashboard: title and uid"
    );
    let mut exprs = Vec::new();
    fn walk(value: &Json, exprs: &mut Vec<String>) {
        match value {
            Json::Object(map) => {
                if let Some(Json::String(expr)) = map.get("expr") {
                    exprs.push(expr.clone());
                }
                map.values().for_each(|v| walk(v, exprs));
            }
            Json::Array(items) => items.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "dashboard: only {} queries", exprs.len());
    let known: BTreeSet<&str> = METRICS.iter().copied().collect();
    let mut used = BTreeSet::new();
    let mut problems = Problems::default();
    for expr in &exprs {
        // Identifiers outside of label matchers ({...}) and strings.
        let mut depth = 0;
        let mut outside = String::new();
        for c in expr.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ if depth == 0 => outside.push(c),
                _ => {}
            }
        }
        for word in outside.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            if !(word.starts_with("cim_") || word.starts_with("process_")) {
                continue;
            }
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix).filter(|b| HISTOGRAMS.contains(b)))
                .unwrap_or(word);
            problems.check(known.contains(base), || {
                format!("dashboard: {expr:?} uses {word}, which no binary exports")
            });
            used.insert(base.to_string());
        }
        // Jobs named in matchers are the ones the Prometheus configs make.
        for part in expr
            .split("job=")
            .skip(1)
            .chain(expr.split("job=~").skip(1))
        {
            let value = part.trim_start_matches('~').trim_start_matches('"');
            let value = value.split('"').next().unwrap_or("");
            for job in value.split('|') {
                problems.check(JOBS.iter().any(|(j, _)| *j == job), || {
                    format!("dashboard: job {job:?} in {expr:?}")
                });
            }
        }
    }
    let unused: Vec<&&str> = METRICS.iter().filter(|m| !used.contains(**m)).collect();
    problems.check(unused.is_empty(), || {
        format!("dashboard: no panel shows {unused:?}")
    });
    problems.assert_none("dashboard");
}

/// The paths probes and scrapes use, answered by a real server and route (in this process,
/// on real Redis and etcd), on the listener each file uses them on.
#[tokio::test]
async fn probe_and_scrape_paths_are_served() -> anyhow::Result<()> {
    let mut problems = Problems::default();
    let compose = Compose::load(&mut problems);
    let k8s = K8s::load(&mut problems);
    problems.assert_none("loading the files");
    let mut uses = BTreeSet::new();
    for (name, (binary, loaded)) in &compose.cim {
        let kind = Kind::of(binary).unwrap();
        let service = &compose.services[name.as_str()];
        if let Some((port, path)) =
            healthcheck_request(&string_list(&service["healthcheck"]["test"]))
        {
            let listener = match loaded {
                Loaded::Server(c) if port == port_of(&c.internal_listen) => Listener::Internal,
                Loaded::Route(c) if port == port_of(&c.http_listen) => Listener::Http,
                _ => panic!("compose.yaml {name}: healthcheck port {port}"),
            };
            uses.insert(PathUse {
                kind,
                listener,
                path,
                source: format!("compose.yaml {name} healthcheck"),
            });
        }
    }
    for workload in &k8s.cim {
        let kind = Kind::of(&workload.binary).unwrap();
        for probe in ["readinessProbe", "livenessProbe"] {
            if let Some(path) = workload.container[probe]["httpGet"]["path"].as_str() {
                let listener = if kind == Kind::Server {
                    Listener::Internal
                } else {
                    Listener::Http
                };
                uses.insert(PathUse {
                    kind,
                    listener,
                    path: path.into(),
                    source: format!("{} {probe}", workload.source),
                });
            }
        }
        let annotations = &workload.workload["spec"]["template"]["metadata"]["annotations"];
        if let Some(path) = annotations["prometheus.io/path"].as_str() {
            uses.insert(PathUse {
                kind,
                listener: Listener::Internal,
                path: path.into(),
                source: format!("{} prometheus.io/path", workload.source),
            });
        }
    }
    let prometheus = yaml(&repo().join("deploy/prometheus/prometheus.yml"));
    for (job, kind) in JOBS {
        for scrape in prometheus["scrape_configs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["job_name"] == job)
        {
            let path = scrape["metrics_path"].as_str().unwrap_or("/metrics");
            uses.insert(PathUse {
                kind,
                listener: Listener::Internal,
                path: path.into(),
                source: format!("prometheus.yml job {job}"),
            });
        }
    }
    // What nginx sends to the routes and servers.
    uses.insert(PathUse {
        kind: Kind::Route,
        listener: Listener::Http,
        path: "/".into(),
        source: "cim.conf location /".into(),
    });

    let cluster = cim_tests::cluster::Cluster::builder()
        .servers(1)
        .routes(1)
        .start()
        .await?;
    let server = &cluster.servers[0];
    let route = &cluster.routes[0];
    let http = reqwest::Client::new();
    let mut failures = Problems::default();
    for use_ in &uses {
        let addr = match (use_.kind, use_.listener) {
            (Kind::Server, Listener::Internal) => server.internal_addr,
            (Kind::Route, Listener::Http) => route.http_addr,
            (Kind::Route, Listener::Internal) => route.internal_addr,
            other => panic!("no such listener {other:?}"),
        };
        let status = http
            .get(format!("http://{addr}{}", use_.path))
            .send()
            .await?
            .status();
        failures.check(
            ANSWER_200.contains(&use_.path.as_str()) || use_.path == "/",
            || format!("{}: {} is not in ANSWER_200", use_.source, use_.path),
        );
        failures.check(status == 200, || {
            format!(
                "{}: GET {} on {:?} of {:?} answered {status}",
                use_.source, use_.path, use_.listener, use_.kind
            )
        });
    }
    // The SSE location of nginx is a real endpoint (401 without an API key, not 404).
    let status = http
        .get(format!("http://{}/api/admin/events", route.http_addr))
        .send()
        .await?
        .status();
    failures.check(status == 401, || {
        format!("GET /api/admin/events answered {status}, 401 expected")
    });
    // The WebSocket pass-through's path is the servers' WebSocket path.
    let ws = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.ws_addr)).await;
    failures.check(ws.is_ok(), || {
        format!("WebSocket /ws on the server: {:?}", ws.err())
    });
    // Every metric the dashboard may use is exported: the families (`# TYPE` lines) of the
    // server's and the route's scrapes; a counter's family drops the `_total` of its series.
    let mut exported = BTreeSet::new();
    for addr in [server.internal_addr, route.internal_addr] {
        let text = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    exported.insert(name.to_string());
                    if kind == "counter" {
                        exported.insert(format!("{name}_total"));
                    }
                }
            }
        }
    }
    for name in METRICS {
        failures.check(exported.contains(*name), || {
            format!("{name} is in METRICS (the dashboard's list) but no binary exports it")
        });
    }
    failures.assert_none("probe and scrape paths");
    Ok(())
}

/// The Redis Cluster override of compose.yaml: every cim service of compose.yaml gets a
/// cluster URL that loads and validates with its other settings, naming exactly the nodes the
/// file runs with `--cluster-enabled yes`, which the init service joins.
#[test]
fn the_redis_cluster_override_points_every_cim_process_at_its_nodes() {
    let mut problems = Problems::default();
    let base = Compose::load(&mut problems);
    let path = repo().join("deploy/compose/compose.redis-cluster.yaml");
    let doc = yaml(&path);
    let services = doc["services"].as_object().expect("services");
    let nodes: Vec<&String> = services
        .iter()
        .filter(|(_, s)| {
            string_list(&s["command"])
                .windows(2)
                .any(|w| w[0] == "--cluster-enabled" && w[1] == "yes")
        })
        .map(|(name, _)| name)
        .collect();
    assert!(nodes.len() >= 3, "a cluster needs 3 masters: {nodes:?}");
    let init = string_list(&services["redis-cluster-init"]["command"]).join(" ");
    assert!(init.contains("redis-cli --cluster create"), "{init}");
    for node in &nodes {
        assert!(
            init.contains(node.as_str()),
            "the init does not join {node}: {init}"
        );
        assert!(
            base.services.get(node.as_str()).is_none(),
            "{node} clashes with compose.yaml"
        );
    }
    for (name, (binary, _)) in &base.cim {
        let service = services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml's {name} is not moved to the cluster"));
        assert_eq!(
            service["depends_on"]["redis-cluster-init"]["condition"],
            "service_completed_successfully",
            "{name}"
        );
        let kind = Kind::of(binary).unwrap();
        let mut env = BTreeMap::new();
        for (k, v) in compose_env(&base.services[name])
            .into_iter()
            .chain(compose_env(service))
        {
            env.insert(k, compose_interpolate(&v).unwrap_or(v));
        }
        let loaded = load_env(kind, &env, &format!("{name} with the override"))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = &loaded.backend().redis_url;
        let Ok(cim_common::store::RedisTarget::Cluster(seeds)) =
            cim_common::store::RedisTarget::parse(url)
        else {
            panic!("{name}: {url} is not a Redis Cluster URL");
        };
        let hosts: Vec<String> = seeds
            .iter()
            .map(|s| {
                s.trim_start_matches("redis://")
                    .split(':')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let expected: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        assert_eq!(hosts, expected, "{name}: seeds");
    }
    problems.assert_none("compose.redis-cluster.yaml");
}

/// The Redis Cluster overlay of deploy/k8s: the single Redis deleted, every server and route
/// patched to a cluster URL whose seeds are pods of the overlay's StatefulSet behind its
/// headless Service, and the init Job joining all its pods with one replica per master.
#[test]
fn the_k8s_redis_cluster_overlay_points_every_cim_process_at_its_pods() {
    let dir = repo().join("deploy/k8s/redis-cluster");
    let kustomization = yaml(&dir.join("kustomization.yaml"));
    assert_eq!(
        string_list(&kustomization["resources"]),
        ["..", "redis-cluster.yaml"]
    );
    let docs = yaml_docs(&dir.join("redis-cluster.yaml"));
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("redis-cluster.yaml: no {kind}"))
    };
    let (service, set, job) = (of_kind("Service"), of_kind("StatefulSet"), of_kind("Job"));
    let service_name = service["metadata"]["name"].as_str().unwrap();
    assert_eq!(service["spec"]["clusterIP"], "None");
    assert_eq!(set["spec"]["serviceName"], service_name);
    let pods = set["spec"]["replicas"].as_u64().unwrap();
    let command = string_list(&set["spec"]["template"]["spec"]["containers"][0]["command"]);
    assert!(
        command
            .windows(2)
            .any(|w| w[0] == "--cluster-enabled" && w[1] == "yes"),
        "{command:?}"
    );
    let init = string_list(&job["spec"]["template"]["spec"]["containers"][0]["command"]).join(" ");
    assert!(init.contains("--cluster-replicas 1"), "{init}");
    assert!(
        pods >= 6 && pods % 2 == 0,
        "3+ masters with a replica each: {pods} pods"
    );
    assert!(
        init.contains(&format!(
            "for i in {}",
            (0..pods)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        )),
        "{init}"
    );

    let patches: Vec<String> = kustomization["patches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["patch"].as_str().unwrap().to_string())
        .collect();
    for deleted in [
        "kind: StatefulSet\n  metadata:\n    name: redis",
        "kind: Service\n  metadata:\n    name: redis",
    ] {
        let deleted = deleted.replace("\n  ", "\n");
        assert!(
            patches
                .iter()
                .any(|p| p.contains("$patch: delete") && p.contains(&deleted)),
            "the single Redis ({deleted}) is not deleted"
        );
    }
    let mut patched = Vec::new();
    for patch in &patches {
        let doc: Json = serde_norway::from_str(patch).unwrap();
        for container in doc["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for env in container["env"].as_array().into_iter().flatten() {
                let name = env["name"].as_str().unwrap();
                if !name.ends_with("_BACKEND__REDIS_URL") {
                    continue;
                }
                let url = env["value"].as_str().unwrap();
                let Ok(cim_common::store::RedisTarget::Cluster(seeds)) =
                    cim_common::store::RedisTarget::parse(url)
                else {
                    panic!("{name}: {url} is not a Redis Cluster URL");
                };
                for seed in seeds {
                    let host = seed
                        .trim_start_matches("redis://")
                        .split(':')
                        .next()
                        .unwrap();
                    let (pod, svc) = host.split_once('.').unwrap();
                    assert_eq!(svc, service_name, "{seed}");
                    let index: u64 = pod.strip_prefix("redis-cluster-").unwrap().parse().unwrap();
                    assert!(index < pods, "{seed}: no such pod");
                }
                patched.push(doc["metadata"]["name"].as_str().unwrap().to_string());
            }
        }
    }
    patched.sort();
    assert_eq!(patched, ["cim-route", "cim-server"]);
}
