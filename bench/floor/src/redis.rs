//! **redis**: the cheapest durable store-and-remove of a 100-byte message in Redis.
//!
//! Starts its own `redis-server` (a free port on 127.0.0.1, a temp dir, `--appendonly yes
//! --appendfsync everysec`, `--save ""`: what cim's Redis runs with for its delivery
//! guarantee), then drives it with RESP written by hand over one plain `TcpStream`: first
//! every message is stored, `HSET inbox:{k} <id> <100-byte value>`, then every one removed,
//! `HDEL inbox:{k} <id>`, `pipeline` commands per round trip, the messages spread over `keys`
//! inboxes (so each holds a few dozen, a small listpack, as a receiver's inbox does).
//!
//! Why it is the floor of a stored private message: cim keeps an unacked message in the
//! receiver's inbox and removes it on the ack; one HSET and one HDEL, pipelined, with no
//! script, no index and no reply beyond an integer, is the least Redis can do for that with the
//! same durability. Redis's CPU (user + system over all its threads, the AOF writes and
//! fsyncs included) is read from `/proc/PID/stat` in clock ticks before and after each phase;
//! the default size keeps it above a second so 10 ms ticks do not matter. The server is
//! killed and its directory removed when the run ends, also on error.

use crate::{
    bail,
    error::{Context as _, Error, Result},
    sys,
};
use serde::{Deserialize, Serialize};
use std::{
    ffi::OsString,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Size of each stored value (the message).
pub const VALUE_BYTES: usize = 100;
/// Digits of a message id: a ULID's length, like cim's message ids.
const ID_BYTES: usize = 26;

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct RedisOpts {
    /// `redis-server`, found on PATH unless it is a path.
    pub server: OsString,
    pub messages: usize,
    pub keys: usize,
    pub pipeline: usize,
}

impl Default for RedisOpts {
    /// 500,000 messages over 10,000 inboxes, 64 commands per round trip: ~2 s of Redis CPU.
    fn default() -> Self {
        Self {
            server: "redis-server".into(),
            messages: 500_000,
            keys: 10_000,
            pipeline: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisReport {
    pub messages: usize,
    pub keys: usize,
    pub pipeline: usize,
    pub value_bytes: usize,
    pub redis_version: String,
    pub clock_ticks_per_sec: u64,
    pub hset: Phase,
    pub hdel: Phase,
    /// Store + remove: Redis CPU per message for both commands, and messages per second
    /// over both phases.
    pub total: Phase,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    /// Redis's CPU (user + system, all threads), ms.
    pub cpu_ms: f64,
    pub cpu_us_per_message: f64,
    pub secs: f64,
    pub messages_per_sec: f64,
}

/// Fails unless the redis-server of `o` can be found (`all` checks before its long first steps).
pub fn check_server(o: &RedisOpts) -> Result<()> {
    find_program(&o.server).map(|_| ())
}

/// Runs the store-and-remove phases against a fresh redis-server.
pub fn run(o: &RedisOpts) -> Result<RedisReport> {
    if o.messages == 0 || o.keys == 0 || o.pipeline == 0 {
        bail!("redis: messages, keys and pipeline must be at least 1");
    }
    let server = RedisServer::start(&o.server)?;
    let mut conn = Conn::open(server.port)?;
    eprintln!(
        "floor redis: redis-server {} (pid {}, port {}): {} messages over {} keys, {} per pipeline",
        conn.version, server.pid, server.port, o.messages, o.keys, o.pipeline
    );
    let value = [b'v'; VALUE_BYTES];
    let key = |i: usize| format!("inbox:{{{}}}", i % o.keys);
    let id = |i: usize| format!("{i:0ID_BYTES$}");

    let ticks = sys::clock_ticks_per_sec();
    let phase = |conn: &mut Conn, name: &str, command: &dyn Fn(&mut Vec<u8>, usize)| {
        let t0 = Instant::now();
        let c0 = sys::process_cpu_ticks(server.pid)?;
        let mut total = 0;
        let mut i = 0;
        while i < o.messages {
            let n = o.pipeline.min(o.messages - i);
            conn.out.clear();
            for j in i..i + n {
                command(&mut conn.out, j);
            }
            total += conn
                .round_trip(n)
                .with_context(|| format!("redis {name}"))?;
            i += n;
        }
        let c1 = sys::process_cpu_ticks(server.pid)?;
        let secs = t0.elapsed().as_secs_f64();
        if total != o.messages as i64 {
            bail!("redis {name}: {total} fields changed, not {}", o.messages);
        }
        Ok::<_, Error>(((c1 - c0) as f64 * 1e3 / ticks as f64, secs))
    };
    let (hset_ms, hset_secs) = phase(&mut conn, "HSET", &|out, i| {
        resp(out, &[b"HSET", key(i).as_bytes(), id(i).as_bytes(), &value]);
    })?;
    let (hdel_ms, hdel_secs) = phase(&mut conn, "HDEL", &|out, i| {
        resp(out, &[b"HDEL", key(i).as_bytes(), id(i).as_bytes()]);
    })?;
    conn.out.clear();
    resp(&mut conn.out, &[b"DBSIZE"]);
    let left = conn.round_trip(1).context("redis DBSIZE")?;
    if left != 0 {
        bail!("redis: {left} keys left after removing every message");
    }
    drop(server);

    let phase = |cpu_ms: f64, secs: f64| Phase {
        cpu_ms,
        cpu_us_per_message: cpu_ms * 1e3 / o.messages as f64,
        secs,
        messages_per_sec: o.messages as f64 / secs,
    };
    let report = RedisReport {
        messages: o.messages,
        keys: o.keys,
        pipeline: o.pipeline,
        value_bytes: VALUE_BYTES,
        redis_version: conn.version.clone(),
        clock_ticks_per_sec: ticks,
        hset: phase(hset_ms, hset_secs),
        hdel: phase(hdel_ms, hdel_secs),
        total: phase(hset_ms + hdel_ms, hset_secs + hdel_secs),
    };
    if hset_ms + hdel_ms < 1000.0 {
        eprintln!(
            "floor redis: only {:.0} ms of Redis CPU: figures within ±{:.0} % (more messages for less)",
            hset_ms + hdel_ms,
            2e5 / ticks as f64 / (hset_ms + hdel_ms).max(1.0)
        );
    }
    eprintln!(
        "floor redis: Redis CPU per message {:.2} µs HSET + {:.2} µs HDEL = {:.2} µs; {:.0} messages/s stored and removed",
        report.hset.cpu_us_per_message,
        report.hdel.cpu_us_per_message,
        report.total.cpu_us_per_message,
        report.total.messages_per_sec
    );
    Ok(report)
}

/// Appends one command as a RESP array of bulk strings.
fn resp(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One connection: writes a pipeline, reads its integer replies.
struct Conn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    out: Vec<u8>,
    version: String,
}

impl Conn {
    fn open(port: u16) -> Result<Self> {
        let stream =
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).context("redis: connecting")?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        let mut conn = Self {
            stream,
            reader,
            out: Vec::new(),
            version: String::new(),
        };
        resp(&mut conn.out, &[b"INFO", b"server"]);
        conn.stream.write_all(&conn.out)?;
        let info = conn.bulk().context("redis: INFO server")?;
        conn.version = (info.lines())
            .find_map(|l| l.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Ok(conn)
    }

    /// Sends `self.out` (holding `n` commands) and returns the sum of the `n` integer replies.
    fn round_trip(&mut self, n: usize) -> Result<i64> {
        self.stream.write_all(&self.out)?;
        let mut sum = 0;
        let mut line = String::new();
        for _ in 0..n {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the server closed the connection");
            }
            let line = line.trim_end();
            match line.split_at_checked(1) {
                Some((":", v)) => sum += v.parse::<i64>().context("an integer reply")?,
                _ => bail!("unexpected reply {line:?}"),
            }
        }
        Ok(sum)
    }

    /// Reads one bulk-string reply.
    fn bulk(&mut self) -> Result<String> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let len: usize = match line.trim_end().strip_prefix('$') {
            Some(len) => len.parse().context("a bulk length")?,
            None => bail!("unexpected reply {:?}", line.trim_end()),
        };
        let mut body = vec![0; len + 2];
        self.reader.read_exact(&mut body)?;
        body.truncate(len);
        String::from_utf8(body).context("a bulk reply")
    }
}

/// A redis-server of our own: killed and reaped on drop, then its directory removed.
struct RedisServer {
    child: Child,
    pid: u32,
    port: u16,
    _dir: TempDir,
}

/// A directory removed with everything in it on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisServer {
    fn start(program: &OsString) -> Result<Self> {
        let program = find_program(program)?;
        let dir = TempDir(std::env::temp_dir().join(format!(
            "cim-floor-redis-{}-{}",
            std::process::id(),
            sys::now_ns()
        )));
        std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
        let log = dir.0.join("redis.log");
        // A port taken between our probe and redis's bind makes it exit: try another.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = Command::new(&program);
            cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&dir.0)
                .args(["--appendonly", "yes", "--appendfsync", "everysec"])
                .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
                .arg("--logfile")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            sys::die_with_parent(&mut cmd);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return Ok(Self {
                        pid: child.id(),
                        child,
                        port,
                        _dir: dir,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = Some(e);
                }
            }
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        Err(Error::new(format!(
            "redis-server did not start: {}; its log ends with: {}",
            last_error.map(|e| e.to_string()).unwrap_or_default(),
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )))
    }
}

/// Waits (≤ 10 s) until the server on `port` answers PING; fails at once if it exits.
fn wait_ready(child: &mut Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("it exited ({status})");
        }
        if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut reply = [0u8; 7];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read_exact(&mut reply).is_ok()
                && &reply == b"+PONG\r\n"
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("no PONG within 10 s");
        }
        // Nothing to wait on but the port: retry shortly.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `program` itself if it names a path, else the first executable of that name on PATH.
fn find_program(program: &OsString) -> Result<PathBuf> {
    let p = Path::new(program);
    if p.components().count() > 1 {
        if is_executable(p) {
            return Ok(p.to_owned());
        }
        bail!("{} is not an executable file", p.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(p))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            Error::new(format!(
                "{} not found on PATH: install Redis (Debian: apt-get install redis-server) or give its path with --redis-server",
                p.display()
            ))
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}
