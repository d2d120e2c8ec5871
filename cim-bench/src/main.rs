//! `cim-bench`: the load generator. Logs its users in through a running cluster's route
//! (business API, `--api-key`), finds the servers in its etcd, and runs one scenario
//! (`connect`, `p2p`, `fanout`, `group`; `login-flood` needs only a route's URL); everything it does is
//! in [`cim_bench`], this file only parses flags. Progress goes to stderr once a second, the
//! summary to stdout (one JSON object with `--json`). Exit status 1 when the scenario could not
//! run, 2 for bad flags.

use cim_bench::{
    self as bench, ConnectOpts, FanoutOpts, GroupOpts, Load, LoginFloodOpts, P2pOpts, Setup, Target,
};
use cim_sdk::Transport;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::{net::IpAddr, process::ExitCode, time::Duration};

/// Load generator for a cim cluster: connections, private messages, group fan-out.
///
/// Bench users are `bench-{k}` accounts, created in bulk through the route's business API as
/// connect-only accounts (no password: nobody logs in to them with one) and logged in with
/// its admin connect call, a batch at a time just before the batch connects, so no HTTP
/// login or password hashing is measured. One process opens at most 19,000 connections: run
/// several with disjoint --user-offset ranges for more.
#[derive(Parser, Debug)]
#[command(name = "cim-bench", version)]
struct Cli {
    #[command(flatten)]
    cluster: ClusterFlags,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Tokio worker threads of the bench (0: one per core). One by default: the bench shares
    /// the machine with the cluster it measures, and like the cim processes it spends less
    /// CPU on one worker than on one per core (measured on 2 cores at 10,000 msg/s: 16–23 %
    /// less bench CPU per message), which leaves more of the machine to the cluster.
    #[arg(long, global = true, default_value_t = 1, value_parser = parse_worker_threads)]
    worker_threads: usize,
    /// Connect over TLS: the servers' tls_addr (TCP) or wss_addr (WebSocket).
    #[arg(long, global = true)]
    tls: bool,
    /// CA certificate (PEM) trusted besides the system's roots, with --tls.
    #[arg(long, global = true, env = "CIM_CA_FILE", requires = "tls")]
    ca_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

/// Where the cluster under test is (connect, p2p, fanout).
#[derive(Args, Debug)]
struct ClusterFlags {
    /// Base URL of one of the cluster's routes: its business API logs the bench users in.
    #[arg(long = "route", default_value = "http://127.0.0.1:8080")]
    route_url: String,
    /// One of the route's api_keys.
    #[arg(long, env = "CIM_API_KEY", hide_env_values = true, default_value = "")]
    api_key: String,
    /// etcd endpoint (repeat for several): where the live servers are listed.
    #[arg(
        long = "etcd",
        value_name = "ENDPOINT",
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// The cluster's key prefix.
    #[arg(long, default_value = "cim")]
    prefix: String,
    /// Redis's pid on this machine: its CPU time is read from /proc and counted in the CPU
    /// per message (without it, the Redis figure is left out). Repeat it for each node of a
    /// Redis Cluster: their CPU times are summed.
    #[arg(long = "redis-pid")]
    redis_pids: Vec<u32>,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Open N connections at a rate, hold them with heartbeats, report connect rate and
    /// server memory per connection.
    Connect(ConnectArgs),
    /// Private messages between pairs across two servers: throughput, one-way latency, loss,
    /// CPU per message.
    P2p(P2pArgs),
    /// Group messages from one sender to N receivers: time to the last receipt, missing
    /// deliveries, CPU per delivery. Nobody else should be online.
    Fanout(FanoutArgs),
    /// Messages to a stored group (conversations) of --members, --online of them connected:
    /// time to the last online receipt, Redis CPU per message, then the catch-up of
    /// --catch-up members that were offline for all of it. Nobody else should be online.
    Group(GroupArgs),
    /// Wrong-password logins against one route on this machine (no API key or etcd needed):
    /// the route's peak and resident memory (VmHWM, VmRSS) before, right after, and
    /// --settle after.
    LoginFlood(LoginFloodArgs),
}

#[derive(Args, Debug)]
struct LoginFloodArgs {
    /// The route's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    route: String,
    /// Wrong-password logins to send.
    #[arg(long, default_value_t = 1000)]
    logins: usize,
    /// Most logins in flight at once.
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// How long after the last answer the memory is read again.
    #[arg(long, default_value = "5s", value_parser = bench::parse_duration)]
    settle: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TransportArg {
    Tcp,
    Ws,
}

impl From<TransportArg> for Transport {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Tcp => Transport::Tcp,
            TransportArg::Ws => Transport::WsBinary,
        }
    }
}

#[derive(Args, Debug)]
struct Common {
    /// Connection transport (ws: WebSocket with binary protobuf frames).
    #[arg(long, value_enum, default_value = "tcp")]
    transport: TransportArg,
    /// First bench user number: users are bench-{offset}, bench-{offset+1}, …
    #[arg(long, default_value_t = 0)]
    user_offset: u64,
}

#[derive(Args, Debug)]
struct ConnectArgs {
    /// Connections to open (at most 19,000 per process).
    #[arg(long)]
    connections: usize,
    /// How long to hold them once all are open (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = bench::parse_duration)]
    hold: Duration,
    /// Local IPs to bind, cycled (e.g. 127.0.0.2-127.0.0.40): more ephemeral ports.
    #[arg(long, value_parser = parse_ip_list)]
    source_ips: Option<IpList>,
    /// New connections per second.
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct P2pArgs {
    /// Sender/receiver pairs.
    #[arg(long)]
    pairs: usize,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = bench::parse_duration)]
    duration: Duration,
    /// Total messages per second over all senders [default: 1000].
    #[arg(long, conflicts_with = "flat_out")]
    rate: Option<f64>,
    /// Send as fast as answers come: each sender keeps --window sends outstanding.
    #[arg(long)]
    flat_out: bool,
    /// Outstanding sends per sender with --flat-out.
    #[arg(long, default_value_t = 32)]
    window: usize,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    /// Receivers, round-robin over the live servers.
    #[arg(long)]
    receivers: usize,
    /// Time between two group messages.
    #[arg(long, default_value = "1s", value_parser = bench::parse_duration)]
    interval: Duration,
    /// Group messages to send.
    #[arg(long, default_value_t = 10)]
    count: usize,
    /// Receivers in other cim-bench processes (run with --receive-only): wait until this
    /// many users besides this process's are online before the first message.
    #[arg(long, default_value_t = 0)]
    others: usize,
    /// No sender: connect the receivers and note the receipts of the --count messages that
    /// a sending process (with --others) sends.
    #[arg(long)]
    receive_only: bool,
    /// Longest wait for the --others to be online, or (--receive-only) for the first message.
    #[arg(long, default_value = "300s", value_parser = bench::parse_duration)]
    start_wait: Duration,
    /// Local IPs to bind, cycled (e.g. 127.0.0.2-127.0.0.40): more ephemeral ports.
    #[arg(long, value_parser = parse_ip_list)]
    source_ips: Option<IpList>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct GroupArgs {
    /// Members of the group, the sender (its owner) included: at most the route's
    /// `groups.max_members` (2,000 by default).
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Members connected while the messages go out, besides the sender.
    #[arg(long, default_value_t = 500)]
    online: usize,
    /// Messages to send.
    #[arg(long, default_value_t = 500)]
    count: usize,
    /// Messages per second [default: 50].
    #[arg(long, conflicts_with = "flat_out")]
    rate: Option<f64>,
    /// Send as fast as answers come, keeping --window sends outstanding.
    #[arg(long)]
    flat_out: bool,
    /// Outstanding sends with --flat-out.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Offline members that connect after the messages, one at a time, and catch up on them
    /// (0: none).
    #[arg(long, default_value_t = 10)]
    catch_up: usize,
    #[command(flatten)]
    common: Common,
}

/// The addresses of one `--source-ips` value (a newtype: clap would read a `Vec` as a flag
/// given several times).
#[derive(Clone, Debug)]
struct IpList(Vec<IpAddr>);

fn parse_ip_list(s: &str) -> Result<IpList, String> {
    bench::parse_ips(s).map(IpList)
}

/// The load of `--flat-out` / `--rate` (`default` messages per second when neither is given).
fn load(flat_out: bool, rate: Option<f64>, default: f64) -> Load {
    match flat_out {
        true => Load::FlatOut,
        false => Load::Rate(rate.unwrap_or(default)),
    }
}

fn parse_worker_threads(s: &str) -> Result<usize, String> {
    let n = s.parse().map_err(|e| format!("{e}"))?;
    cim_common::cli::validate_worker_threads(n)?;
    Ok(n)
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    let json = cli.json;
    let render = |text: String, value: serde_json::Value| {
        if json {
            value.to_string()
        } else {
            text
        }
    };
    let tls = match cli.tls {
        true => Some(cim_sdk::ClientTls::new(cli.ca_file.as_deref())?),
        false => None,
    };
    let flags = cli.cluster;
    let target = Target {
        route: flags.route_url,
        api_key: flags.api_key,
        etcd_endpoints: flags.etcd,
        prefix: flags.prefix,
    };
    let redis_pids = flags.redis_pids;
    // Every scenario but login-flood runs against the cluster's route and etcd.
    let setup = || async {
        anyhow::Ok(
            Setup::connect(&target)
                .await?
                .with_progress(true)
                .with_tls(tls)
                .with_redis_pids(redis_pids.clone()),
        )
    };
    Ok(match cli.scenario {
        Scenario::Connect(a) => {
            let opts = ConnectOpts {
                connections: a.connections,
                transport: a.common.transport.into(),
                hold: a.hold,
                source_ips: a.source_ips.map(|l| l.0).unwrap_or_default(),
                rate: a.rate,
                user_offset: a.common.user_offset,
            };
            let r = bench::run_connect(&setup().await?, opts).await?;
            render(r.to_string(), serde_json::to_value(&r)?)
        }
        Scenario::P2p(a) => {
            let opts = P2pOpts {
                pairs: a.pairs,
                duration: a.duration,
                load: load(a.flat_out, a.rate, 1000.0),
                window: a.window,
                transport: a.common.transport.into(),
                user_offset: a.common.user_offset,
            };
            let r = bench::run_p2p(&setup().await?, opts).await?;
            render(r.to_string(), serde_json::to_value(&r)?)
        }
        Scenario::Fanout(a) => {
            let opts = FanoutOpts {
                receivers: a.receivers,
                interval: a.interval,
                count: a.count,
                transport: a.common.transport.into(),
                user_offset: a.common.user_offset,
                others: a.others,
                receive_only: a.receive_only,
                start_wait: a.start_wait,
                source_ips: a.source_ips.map(|l| l.0).unwrap_or_default(),
            };
            let r = bench::run_fanout(&setup().await?, opts).await?;
            render(r.to_string(), serde_json::to_value(&r)?)
        }
        Scenario::Group(a) => {
            let opts = GroupOpts {
                members: a.members,
                online: a.online,
                load: load(a.flat_out, a.rate, 50.0),
                window: a.window,
                count: a.count,
                catch_up: a.catch_up,
                transport: a.common.transport.into(),
                user_offset: a.common.user_offset,
            };
            let r = bench::run_group(&setup().await?, opts).await?;
            render(r.to_string(), serde_json::to_value(&r)?)
        }
        Scenario::LoginFlood(a) => {
            let opts = LoginFloodOpts {
                route: a.route,
                logins: a.logins,
                concurrency: a.concurrency,
                settle: a.settle,
            };
            let r = bench::run_login_flood(opts).await?;
            render(r.to_string(), serde_json::to_value(&r)?)
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match cim_common::cli::runtime(cli.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cim-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(summary) => {
            println!("{}", summary.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cim-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_parse() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "cim-bench",
            "--route",
            "http://127.0.0.1:18080",
            "--api-key",
            "k",
            "--etcd",
            "http://127.0.0.1:23790",
            "--redis-pid",
            "42",
            "--redis-pid",
            "43",
            "p2p",
            "--pairs",
            "2",
        ])
        .unwrap();
        assert_eq!(cli.cluster.route_url, "http://127.0.0.1:18080");
        assert_eq!(cli.cluster.api_key, "k");
        assert_eq!(cli.cluster.etcd, ["http://127.0.0.1:23790"]);
        assert_eq!(cli.cluster.redis_pids, [42, 43]);
        assert!(matches!(cli.scenario, Scenario::P2p(_)));
        let cli =
            Cli::try_parse_from(["cim-bench", "group", "--flat-out", "--members", "2000"]).unwrap();
        let Scenario::Group(a) = cli.scenario else {
            panic!("not group")
        };
        assert!(a.flat_out && a.rate.is_none());
        assert_eq!((a.members, a.online, a.catch_up), (2000, 500, 10));
        assert!(Cli::try_parse_from(["cim-bench", "group", "--flat-out", "--rate", "5"]).is_err());
        // login-flood keeps its own --route.
        let cli =
            Cli::try_parse_from(["cim-bench", "login-flood", "--route", "http://x:1"]).unwrap();
        let Scenario::LoginFlood(a) = cli.scenario else {
            panic!("not login-flood")
        };
        assert_eq!(a.route, "http://x:1");
    }
}
