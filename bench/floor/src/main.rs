//! `cim-floor`: the machine's performance floor (issue 22). Parses flags, runs the scenarios
//! of the library, prints their reports on stdout (one JSON object with `--json`), progress on
//! stderr. The hidden `internal-*` subcommands are the other processes of a scenario, started
//! by the scenario itself.

use cim_floor::{
    broadcast::{self, BroadcastOpts, BroadcastReport},
    error::{Context as _, Result},
    redis::{self, RedisOpts, RedisReport},
    relay::{self, Load, RelayOpts, RelayReport, Scenario},
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::{ffi::OsString, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

#[derive(Parser)]
#[command(
    name = "cim-floor",
    version,
    about = "What this machine costs before any cim code: loopback broadcast, a one-hop epoll relay, Redis store-and-remove"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One process writes one 100-byte message to each of N loopback connections, M times
    Broadcast {
        #[command(flatten)]
        broadcast: BroadcastArgs,
        /// One JSON object on stdout instead of text
        #[arg(long)]
        json: bool,
    },
    /// Client → relay → client, one read and one write per hop: unloaded, at a rate, flat out
    Relay {
        #[command(flatten)]
        relay: RelayArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pipelined HSET then HDEL of 100-byte values on its own AOF redis-server
    Redis {
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long)]
        json: bool,
    },
    /// broadcast, relay and redis in a row (about 20 s at the default sizes)
    All {
        #[command(flatten)]
        broadcast: BroadcastArgs,
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long)]
        json: bool,
    },
    #[command(hide = true)]
    InternalBroadcastClient {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        connections: usize,
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        max_secs: u64,
    },
    #[command(hide = true)]
    InternalRelayServer {
        #[arg(long)]
        pairs: usize,
        #[arg(long)]
        max_secs: u64,
    },
    #[command(hide = true)]
    InternalRelayClients {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        first_pair: usize,
        #[arg(long)]
        pairs: usize,
        #[arg(long, conflicts_with = "window", required_unless_present = "window")]
        rate: Option<f64>,
        #[arg(long)]
        window: Option<usize>,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long)]
        max_secs: u64,
    },
}

#[derive(Args, Clone)]
struct BroadcastArgs {
    /// Connections the writer accepts and writes each message to
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    connections: u64,
    /// Broadcast messages, each written to every connection
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    messages: u64,
    /// Pause between every receiver having a message and the next one (e.g. 100ms, 1s)
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    interval: Duration,
    /// Connections per client process (each process holds its connections plus a few files)
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=19_000))]
    connections_per_process: u64,
}

#[derive(Args, Clone)]
struct RelayArgs {
    /// How long each relay scenario sends (e.g. 5s, 300ms)
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Messages per second of the unloaded scenario (1 pair)
    #[arg(long, default_value_t = 200.0, value_parser = parse_rate)]
    unloaded_rate: f64,
    /// Pairs of the rate scenario
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=9_000))]
    pairs: u64,
    /// Messages per second of the rate scenario, in total over its pairs
    #[arg(long, default_value_t = 10_000.0, value_parser = parse_rate)]
    rate: f64,
    /// Pairs of the flat-out scenario
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=9_000))]
    flat_pairs: u64,
    /// Messages each flat-out sender keeps outstanding
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    window: u64,
    /// Processes the senders and receivers are spread over
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    client_processes: u64,
    /// Relay scenarios to run, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "unloaded,rate,flat")]
    scenarios: Vec<ScenarioName>,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum ScenarioName {
    Unloaded,
    Rate,
    Flat,
}

#[derive(Args, Clone)]
struct RedisArgs {
    /// Messages stored (HSET) and then removed (HDEL)
    #[arg(long, default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    redis_messages: u64,
    /// Inboxes (hash keys) the messages are spread over
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    redis_keys: u64,
    /// Commands per pipelined round trip
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pipeline: u64,
    /// The redis-server program (a name looked up on PATH, or a path)
    #[arg(long, default_value = "redis-server")]
    redis_server: OsString,
}

/// `300ms`, `5s`, `1.5s`, `2m`, or plain seconds; at most an hour.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let secs = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 300ms, 5s, 2m)"))?
        * scale;
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("`{s}`: a duration from 0 to 1 hour"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A rate in messages per second: above 0, at most a million.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1e6 => Ok(r),
        _ => Err(format!(
            "`{s}`: a rate above 0 and at most 1000000 (messages per second)"
        )),
    }
}

impl BroadcastArgs {
    fn opts(&self, exe: PathBuf) -> BroadcastOpts {
        BroadcastOpts {
            connections: self.connections as usize,
            messages: self.messages as usize,
            interval: self.interval,
            per_process: self.connections_per_process as usize,
            ..BroadcastOpts::new(exe)
        }
    }
}

impl RelayArgs {
    fn opts(&self, exe: PathBuf) -> Result<RelayOpts> {
        if self.duration.is_zero() {
            cim_floor::bail!("--duration must be above 0");
        }
        let mut scenarios = Vec::new();
        let mut add = |name: &str, pairs: u64, load| {
            scenarios.push(Scenario {
                name: name.to_owned(),
                pairs: pairs as usize,
                load,
                duration: self.duration,
            })
        };
        for s in [
            ScenarioName::Unloaded,
            ScenarioName::Rate,
            ScenarioName::Flat,
        ] {
            if !self.scenarios.contains(&s) {
                continue;
            }
            match s {
                ScenarioName::Unloaded => add("unloaded", 1, Load::Rate(self.unloaded_rate)),
                ScenarioName::Rate => add("rate", self.pairs, Load::Rate(self.rate)),
                ScenarioName::Flat => add(
                    "flat",
                    self.flat_pairs,
                    Load::Flat {
                        window: self.window as usize,
                    },
                ),
            }
        }
        Ok(RelayOpts {
            scenarios,
            client_processes: self.client_processes as usize,
            ..RelayOpts::new(exe, self.duration)
        })
    }
}

impl RedisArgs {
    fn opts(&self) -> RedisOpts {
        RedisOpts {
            server: self.redis_server.clone(),
            messages: self.redis_messages as usize,
            keys: self.redis_keys as usize,
            pipeline: self.pipeline as usize,
        }
    }
}

/// `all`'s report: the three, with the machine they ran on.
#[derive(Serialize)]
struct AllReport {
    cores: usize,
    duration_secs: f64,
    broadcast: BroadcastReport,
    relay: RelayReport,
    redis: RedisReport,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cim-floor: {e}");
            ExitCode::FAILURE
        }
    }
}

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating this program (it runs itself as the clients)")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Broadcast { broadcast, json } => {
            let r = broadcast::run(&broadcast.opts(exe()?))?;
            output(json, &r, || print_broadcast(&r))
        }
        Command::Relay { relay, json } => {
            let r = relay::run(&relay.opts(exe()?)?)?;
            output(json, &r, || print_relay(&r))
        }
        Command::Redis { redis, json } => {
            let r = redis::run(&redis.opts())?;
            output(json, &r, || print_redis(&r))
        }
        Command::All {
            broadcast,
            relay,
            redis,
            json,
        } => {
            let started = std::time::Instant::now();
            let relay_opts = relay.opts(exe()?)?;
            let redis_opts = redis.opts();
            redis::check_server(&redis_opts)?;
            let b = broadcast::run(&broadcast.opts(exe()?))?;
            let r = relay::run(&relay_opts)?;
            let d = redis::run(&redis_opts)?;
            let all = AllReport {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                duration_secs: started.elapsed().as_secs_f64(),
                broadcast: b,
                relay: r,
                redis: d,
            };
            output(json, &all, || {
                print_broadcast(&all.broadcast);
                print_relay(&all.relay);
                print_redis(&all.redis);
                println!("(took {:.0} s)", all.duration_secs);
            })
        }
        Command::InternalBroadcastClient {
            addr,
            connections,
            messages,
            max_secs,
        } => broadcast::client_main(addr, connections, messages, Duration::from_secs(max_secs)),
        Command::InternalRelayServer { pairs, max_secs } => {
            relay::server_main(pairs, Duration::from_secs(max_secs))
        }
        Command::InternalRelayClients {
            addr,
            first_pair,
            pairs,
            rate,
            window,
            duration_ms,
            max_secs,
        } => {
            let load = match (rate, window) {
                (Some(r), None) => Load::Rate(r),
                (None, Some(w)) => Load::Flat { window: w },
                _ => cim_floor::bail!("exactly one of --rate and --window"),
            };
            relay::clients_main(
                addr,
                first_pair,
                pairs,
                load,
                Duration::from_millis(duration_ms),
                Duration::from_secs(max_secs),
            )
        }
    }
}

fn output<T: Serialize>(json: bool, report: &T, text: impl FnOnce()) -> Result<()> {
    if json {
        let s = serde_json::to_string_pretty(report).context("encoding the report")?;
        println!("{s}");
    } else {
        text();
    }
    Ok(())
}

fn print_broadcast(r: &BroadcastReport) {
    println!(
        "broadcast: {} connections × {} messages of {} bytes ({} client processes)",
        r.connections, r.messages, r.message_bytes, r.client_processes
    );
    println!(
        "  delivered {} / {}; writer CPU per delivery {:.2} µs ({:.2} user + {:.2} system); clients {:.2} µs",
        r.deliveries,
        r.expected_deliveries,
        r.writer_cpu_us_per_delivery,
        r.writer_user_us_per_delivery,
        r.writer_sys_us_per_delivery,
        r.clients_cpu_us_per_delivery
    );
    println!(
        "  first write → last receipt: median {:.1} ms, max {:.1} ms (write loop median {:.1} ms)",
        r.time_to_last_median_ms, r.time_to_last_max_ms, r.write_loop_median_ms
    );
}

fn print_relay(report: &RelayReport) {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    for (name, r) in &report.0 {
        let load = match (r.target_rate, r.window) {
            (Some(rate), _) => format!("{rate:.0} msg/s"),
            (_, Some(w)) => format!("flat out, window {w}"),
            _ => String::new(),
        };
        println!(
            "relay {name}: {} pair(s), {load}, {:.1} s",
            r.pairs, r.duration_secs
        );
        println!(
            "  delivered {} / {} (lost {}, out of order {}), {:.0} msg/s",
            r.delivered, r.sent, r.lost, r.out_of_order, r.throughput_per_sec
        );
        println!(
            "  one-way latency p50 / p99 / p99.9 / max: {} / {} / {} / {} µs",
            f(r.latency_us.p50),
            f(r.latency_us.p99),
            f(r.latency_us.p999),
            f(r.latency_us.max)
        );
        println!(
            "  CPU per message: relay {:.2} µs, all processes {:.2} µs; relay wake-ups / reads / writes per message {:.2} / {:.2} / {:.2}",
            r.relay_cpu_us_per_message,
            r.all_cpu_us_per_message,
            r.relay_wakeups_per_message,
            r.relay_reads_per_message,
            r.relay_writes_per_message
        );
    }
}

fn print_redis(r: &RedisReport) {
    println!(
        "redis {}: {} messages of {} bytes over {} keys, {} per pipeline",
        r.redis_version, r.messages, r.value_bytes, r.keys, r.pipeline
    );
    println!(
        "  Redis CPU per message: HSET {:.2} µs + HDEL {:.2} µs = {:.2} µs ({:.0} ms of CPU)",
        r.hset.cpu_us_per_message,
        r.hdel.cpu_us_per_message,
        r.total.cpu_us_per_message,
        r.total.cpu_ms
    );
    println!(
        "  {:.0} HSET/s, {:.0} HDEL/s, {:.0} messages/s stored and removed",
        r.hset.messages_per_sec, r.hdel.messages_per_sec, r.total.messages_per_sec
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse_or_explain() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("NaN").is_err());
        assert_eq!(parse_rate("200"), Ok(200.0));
    }

    #[test]
    fn flags_are_consistent_and_bad_values_are_errors() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
        let all = Cli::try_parse_from(["cim-floor", "all", "--json", "--duration", "300ms"]);
        assert!(all.is_ok());
        for bad in [
            &["cim-floor", "broadcast", "--connections", "0"][..],
            &["cim-floor", "broadcast", "--connections", "many"],
            &["cim-floor", "relay", "--scenarios", "unloaded,fast"],
            &["cim-floor", "relay", "--rate", "-5"],
            &["cim-floor", "redis", "--pipeline", "0"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }
}
