//! End-to-end tests of the terminal client: the real `cim-client` binary, in a
//! pseudo-terminal (so line editing, the hidden prompt redraws and colours are all live),
//! against a real cluster from the testkit (Redis, etcd, two servers, one route).
//!
//! Every wait is for expected output under a deadline ([`DEADLINE`]); a test that does not see
//! what it expects fails with the terminal's recent output. [`Pty`] kills its child on drop,
//! also when the test panics.

use cim_tests::cluster::Cluster;
use portable_pty::{native_pty_system, Child, CommandBuilder, MasterPty, PtySize};
use std::{
    io::{Read, Write},
    path::Path,
    process::Stdio,
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Longest wait for one expected output.
const DEADLINE: Duration = Duration::from_secs(15);
/// What `:q` wraps around a match (see `render::HIGHLIGHT`).
const HIGHLIGHT: &str = "\x1b[1;30;43m";
const BIN: &str = env!("CARGO_BIN_EXE_cim-client");
/// The business API key of the cluster that forces a client offline.
const API_KEY: &str = "test-api-key-0123456789abcdef";

#[derive(Default)]
struct Screen {
    raw: Vec<u8>,
    closed: bool,
}

/// The client in a pseudo-terminal, with expect-style helpers.
struct Pty {
    name: String,
    prompt: String,
    child: Box<dyn Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    screen: Arc<(Mutex<Screen>, Condvar)>,
    /// Byte offset in the ANSI-stripped output up to which expectations consumed it.
    cursor: usize,
    _master: Box<dyn MasterPty + Send>,
}

/// The output as a person reads it: escape sequences and carriage returns removed.
fn strip_ansi(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters, then one final byte in '@'..='~'.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ST (ESC \).
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' {
                            break;
                        }
                        if c == '\x1b' {
                            chars.next();
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

impl Pty {
    /// Starts `cim-client` with `args` and the password in `CIM_PASSWORD`.
    fn spawn(name: &str, args: &[&str], password: &str, cwd: &Path) -> Pty {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: 50,
                // Wide enough that no line the tests look for wraps.
                cols: 250,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("open a pty");
        let mut cmd = CommandBuilder::new(BIN);
        cmd.args(args);
        cmd.cwd(cwd);
        cmd.env("CIM_PASSWORD", password);
        cmd.env("TERM", "xterm-256color");
        for var in ["NO_COLOR", "CIM_ROUTE", "CIM_NAME", "CIM_DATA_DIR"] {
            cmd.env_remove(var);
        }
        let child = pair.slave.spawn_command(cmd).expect("spawn cim-client");
        // Only the child holds the slave now: its exit closes the pty, which ends our reader.
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().expect("pty reader");
        let writer = pair.master.take_writer().expect("pty writer");
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let shared = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cvar) = &*shared;
                let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
                if n == 0 {
                    s.closed = true;
                    cvar.notify_all();
                    return;
                }
                s.raw.extend_from_slice(&buf[..n]);
                cvar.notify_all();
            }
        });
        Pty {
            name: name.to_string(),
            prompt: format!("{name}> "),
            child,
            writer,
            screen,
            cursor: 0,
            _master: pair.master,
        }
    }

    /// Waits until `needle` appears after the previous match; returns the output from the
    /// previous match up to and including `needle`.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        let (lock, cvar) = &*self.screen;
        let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let text = strip_ansi(&String::from_utf8_lossy(&s.raw));
            if let Some(i) = text[self.cursor..].find(needle) {
                let end = self.cursor + i + needle.len();
                let seen = text[self.cursor..end].to_string();
                self.cursor = end;
                return seen;
            }
            let now = Instant::now();
            if s.closed || now >= deadline {
                let tail: String = {
                    let rest = &text[self.cursor..];
                    let skip = rest.chars().count().saturating_sub(3000);
                    rest.chars().skip(skip).collect()
                };
                let raw = String::from_utf8_lossy(&s.raw);
                let raw_tail: String = {
                    let skip = raw.chars().count().saturating_sub(1500);
                    raw.chars().skip(skip).collect()
                };
                let why = if s.closed {
                    "exited while"
                } else {
                    "15 s passed"
                };
                // Unlock first: a panic while holding the lock would poison it for the reader.
                drop(s);
                panic!(
                    "{}: {why} waiting for {needle:?}; output since the last match:\n{tail}\n\
                     raw output (end):\n{raw_tail:?}",
                    self.name
                );
            }
            s = cvar
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The output from the previous match up to the next prompt: the full answer of a command.
    fn until_prompt(&mut self) -> String {
        let prompt = self.prompt.clone();
        self.expect(&prompt)
    }

    /// Types `line` and Enter. No need to wait for a prompt: keys typed ahead wait in the
    /// terminal (or in the line editor's kept buffer) for the next line-editing session.
    fn line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r").as_bytes())
            .unwrap();
        self.writer.flush().unwrap();
    }

    /// Everything the client wrote so far, escape sequences included.
    fn raw(&self) -> String {
        String::from_utf8_lossy(
            &self
                .screen
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .raw,
        )
        .into_owned()
    }

    /// Waits for the client to exit (its end of the pty closes) and returns its status.
    fn exit_status(&mut self) -> portable_pty::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        {
            let (lock, cvar) = &*self.screen;
            let mut s = lock.lock().unwrap_or_else(PoisonError::into_inner);
            while !s.closed {
                let now = Instant::now();
                if now >= deadline {
                    let output = strip_ansi(&String::from_utf8_lossy(&s.raw));
                    drop(s);
                    panic!("{}: still running after 15 s; output:\n{output}", self.name);
                }
                s = cvar
                    .wait_timeout(s, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        self.child.wait().expect("wait for cim-client")
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // Already exited: kill fails harmlessly. Otherwise this is a failing test's cleanup.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `text` shows `[HH:MM:SS] ` right before `what`.
fn has_time_stamp(text: &str, what: &str) -> bool {
    let Some(at) = text.find(what) else {
        return false;
    };
    let before: Vec<char> = text[..at].chars().collect();
    let Some(stamp) = before.len().checked_sub(11).map(|i| &before[i..]) else {
        return false;
    };
    stamp.iter().enumerate().all(|(i, c)| match i {
        0 => *c == '[',
        3 | 6 => *c == ':',
        9 => *c == ']',
        10 => *c == ' ',
        _ => c.is_ascii_digit(),
    })
}

fn client_args<'a>(route: &'a str, name: &'a str, data_dir: &'a Path) -> Vec<&'a str> {
    vec![
        "--route",
        route,
        "--name",
        name,
        "--register",
        "--data-dir",
        data_dir.to_str().expect("utf-8 temp path"),
    ]
}

/// Writes `input` to a script-mode client, ends its input, and returns its stdout once it
/// exited successfully (within [`DEADLINE`]).
async fn script_output(mut script: tokio::process::Child, input: &[u8]) -> anyhow::Result<String> {
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = script.stdin.take().expect("piped");
        stdin.write_all(input).await?;
    }
    let out = tokio::time::timeout(DEADLINE, script.wait_with_output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_terminals_chat_and_use_every_command() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let route = cluster.routes[0].url();
    let dirs = [
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    ];

    // The terminals block on their output: run them on a blocking thread, the cluster keeps
    // running on its own runtimes.
    let route2 = route.clone();
    let paths: Vec<_> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let (mut alice, mut bob) = tokio::task::spawn_blocking(move || {
        let route = route2;
        let mut alice = Pty::spawn(
            "alice",
            &client_args(&route, "alice", &paths[0]),
            "alice-password",
            &paths[0],
        );
        alice.expect("registered alice");
        alice.expect("connected to server");
        let mut args = client_args(&route, "bob", &paths[1]);
        args.extend(["--transport", "ws"]);
        let mut bob = Pty::spawn("bob", &args, "bob-password", &paths[1]);
        bob.expect("connected to server");

        // Group: a plain line reaches the other terminal, marked "→ all".
        alice.line("hello everyone");
        alice.expect("you → all: hello everyone");
        bob.expect("alice → all: hello everyone");

        // Private, CIM syntax and @ syntax.
        alice.line("bob;;hi bob");
        alice.expect("you → bob: hi bob");
        let seen = bob.expect("alice → you: hi bob");
        assert!(has_time_stamp(&seen, "alice → you"), "{seen:?}");
        bob.line("@alice hi alice");
        bob.expect("you → alice: hi alice");
        alice.expect("bob → you: hi alice");
        // A phrase arriving in one read, as an input method commits it: every character must
        // be taken at once, not only the first (rustyline < 19 left the rest in its buffer).
        bob.line("@alice 你好，世界");
        alice.expect("bob → you: 你好，世界");

        // With a receipt: once bob's client acknowledged it, alice is told.
        alice.line(":r bob did you get this?");
        alice.expect("you → bob: did you get this?");
        bob.expect("alice → you: did you get this?");
        alice.expect("✓ bob received your message (id ");

        // Online users: everyone, then by prefix.
        alice.line(":olu");
        alice.expect("2 users online:");
        let list = alice.until_prompt();
        assert!(
            list.contains("alice (you)") && list.contains("bob"),
            "{list}"
        );
        alice.line(":pu al");
        alice.expect("1 user online whose name starts with \"al\":");
        let list = alice.until_prompt();
        assert!(
            list.contains("alice (you)") && !list.contains("bob"),
            "{list}"
        );

        // Who, where, in which state.
        alice.line(":info");
        alice.expect("user:    alice (#");
        let info = alice.until_prompt();
        assert!(info.contains(&format!("route:   {route}")), "{info}");
        assert!(
            info.contains("server:  ") && !info.contains("server:  none"),
            "{info}"
        );
        assert!(info.contains("state:   connected"), "{info}");

        // Local history search: sent and received private messages, matches highlighted.
        alice.line(":q HI");
        alice.expect("messages match \"HI\":");
        let found = alice.until_prompt();
        assert!(found.contains("alice → bob: hi bob"), "{found}");
        assert!(found.contains("bob → alice: hi alice"), "{found}");
        assert!(
            alice.raw().contains(&format!("{HIGHLIGHT}hi\x1b[0m bob")),
            "the match is highlighted"
        );
        alice.line(":q nothing-like-this");
        alice.expect("no message in the history matches \"nothing-like-this\"");

        // Unknown commands and bad usage answer with help, not a crash.
        alice.line(":nope");
        alice.expect("unknown command :nope");
        alice.expect(":olu");
        alice.line(":delay abc x");
        alice.expect("usage: :delay <seconds> <message>");
        alice.line(":help");
        alice.expect("commands:");

        // Delayed private message.
        alice.line(":delay 1 bob;;later");
        alice.expect("will send to bob in 1s");
        bob.expect("alice → you: later");

        // Channels: join (with or without the #), list, send, leave.
        alice.line("#room1 too early");
        alice.expect("not sent: you are not a member of #room1 (:join room1 first)");
        alice.line(":join room1");
        alice.expect("joined #room1");
        alice.line(":join room1");
        alice.expect("already a member of #room1");
        bob.line(":join #room1");
        bob.expect("joined #room1");
        bob.line(":chans");
        bob.expect("you are in 1 channel:");
        let list = bob.until_prompt();
        assert!(list.contains("#room1  2 members, 2 online"), "{list}");
        alice.line("#room1 hi room");
        alice.expect("you → #room1: hi room");
        let seen = bob.expect("alice → #room1: hi room");
        assert!(has_time_stamp(&seen, "alice → #room1"), "{seen:?}");
        alice.line("#room1");
        alice.expect("nothing to send to #room1: write #room1 <text>");
        alice.line(":join bad/name");
        alice.expect("'/' is not allowed");
        bob.line(":leave room1");
        bob.expect("left #room1");
        bob.line(":chans");
        bob.expect("you are in no channel (:join <channel> to join one).");
        alice.line("#room1 anyone?");
        alice.expect("you → #room1: anyone?");
        alice.expect("(no other member of #room1 is online: not delivered)");
        // Channel messages are in the history and searchable by channel.
        alice.line(":q #room1");
        alice.expect("messages match \"#room1\":");
        let found = alice.until_prompt();
        assert!(found.contains("alice → #room1: hi room"), "{found}");

        // A second login of alice is refused clearly.
        let mut again = Pty::spawn(
            "alice",
            &[
                "--route",
                &route,
                "--name",
                "alice",
                "--data-dir",
                paths[2].to_str().unwrap(),
            ],
            "alice-password",
            &paths[2],
        );
        again.expect("login failed: already logged in");
        assert!(!again.exit_status().success());
        (alice, bob)
    })
    .await?;

    // A script: piped stdin, plain output, exits at the end of its input.
    let script = tokio::process::Command::new(BIN)
        .args(client_args(&route, "carol", dirs[2].path()))
        .args(["--transport", "ws-json"])
        .env("CIM_PASSWORD", "carol-password")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // The end of input (stdin dropped) logs the client out; it exits 0.
    let stdout = script_output(script, b"@alice hi from a script\n:olu\n").await?;
    assert!(stdout.contains("you → alice: hi from a script"), "{stdout}");
    assert!(stdout.contains("3 users online:"), "{stdout}");
    assert!(!stdout.contains('\x1b'), "no colour when piped: {stdout:?}");

    let alice_dir = dirs[0].path().to_path_buf();
    let route2 = route.clone();
    tokio::task::spawn_blocking(move || {
        alice.expect("carol → you: hi from a script");
        // Quitting logs out and exits 0.
        alice.line(":q!");
        alice.expect("logged out");
        assert!(alice.exit_status().success());
        // alice is gone: bob is told that she gets the message at her next login.
        bob.line("alice;;are you there?");
        bob.expect("you → alice: are you there?");
        bob.expect("alice is offline: they will get it at their next login");
        bob.line("carol;;?");
        bob.expect("carol is offline");
        bob.line("nobody;;?");
        bob.expect("not sent: there is no user nobody");
        bob.line(":q!");
        assert!(bob.exit_status().success());

        // Back online, alice gets it, marked as received while offline, with its time.
        let mut alice = Pty::spawn(
            "alice",
            &client_args(&route2, "alice", &alice_dir),
            "alice-password",
            &alice_dir,
        );
        alice.expect("connected to server");
        let seen = alice.expect("[offline] bob → you: are you there?");
        assert!(has_time_stamp(&seen, "[offline] bob → you"), "{seen:?}");
        alice.line(":q!");
        alice.expect("logged out");
        assert!(alice.exit_status().success());
    })
    .await?;

    // The history file is where the README says, private, one JSON object per line.
    let history = dirs[0].path().join(format!(
        "{}/alice/history.jsonl",
        route.trim_start_matches("http://").replace(':', "%3A")
    ));
    let text = std::fs::read_to_string(&history)?;
    assert!(text.lines().count() >= 5, "{text}");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line)?;
    }
    drop(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unreachable_route_fail_clearly() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(1).start().await?;
    cluster.route().register("dave", "right-password").await?;
    let route = cluster.routes[0].url();
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        let data = path.to_str().unwrap();
        let mut wrong = Pty::spawn(
            "dave",
            &["--route", &route, "--name", "dave", "--data-dir", data],
            "wrong-password",
            &path,
        );
        wrong.expect("login failed: wrong name or password");
        assert!(!wrong.exit_status().success());

        // `--register` of a taken name says so, then the login decides.
        let mut taken = Pty::spawn(
            "dave",
            &[
                "--route",
                &route,
                "--name",
                "dave",
                "--register",
                "--data-dir",
                data,
            ],
            "wrong-password",
            &path,
        );
        taken.expect("dave is already registered; logging in");
        taken.expect("login failed: wrong name or password");
        assert!(!taken.exit_status().success());

        // Port 1 on loopback: nothing listens there.
        let mut unreachable = Pty::spawn(
            "dave",
            &[
                "--route",
                "http://127.0.0.1:1",
                "--name",
                "dave",
                "--data-dir",
                data,
            ],
            "right-password",
            &path,
        );
        unreachable.expect("login failed: route http://127.0.0.1:1 unreachable");
        assert!(!unreachable.exit_status().success());
    })
    .await?;
    drop(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_changes_are_shown() -> anyhow::Result<()> {
    let mut cluster = Cluster::builder()
        .route_config(|c| c.api_keys = vec![API_KEY.to_string()])
        .start()
        .await?;
    let route = cluster.routes[0].url();
    let dir = tempfile::tempdir()?;
    let path = dir.path().to_path_buf();
    let (mut erin, first) = tokio::task::spawn_blocking(move || {
        let mut erin = Pty::spawn(
            "erin",
            &client_args(&route, "erin", &path),
            "erin-password",
            &path,
        );
        erin.expect("connected to server ");
        let server = erin.expect(" (");
        (erin, server.trim_end_matches(" (").to_string())
    })
    .await?;

    // A graceful shutdown kicks erin with a reason; the client says so, reconnects on its
    // own and lands on the other server.
    let node = cluster
        .take_server(&first)
        .unwrap_or_else(|| panic!("no server {first:?} in the cluster"));
    node.shutdown().await?;
    let other = cluster.servers[0].id.clone();
    assert_ne!(first, other);
    let (mut erin, user_id) = tokio::task::spawn_blocking(move || {
        erin.expect("kicked: the server is shutting down");
        erin.expect("reconnecting… (attempt 1, retry in ");
        erin.expect(&format!("connected to server {other} ("));
        erin.line(":info");
        erin.expect("user:    erin (#");
        let id: u64 = erin
            .expect(")")
            .trim_end_matches(')')
            .parse()
            .expect("user id");
        erin.expect(&format!("server:  {other} ("));
        erin.expect("state:   connected");
        (erin, id)
    })
    .await?;

    // Forced offline by the business side (its API): said so, no reconnect, exit status 1.
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/api/admin/users/{user_id}/kick",
            cluster.routes[0].url()
        ))
        .header("X-Api-Key", API_KEY)
        .json(&serde_json::json!({"reason": "maintenance"}))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<serde_json::Value>().await?,
        serde_json::json!({"kicked": true})
    );
    tokio::task::spawn_blocking(move || {
        erin.expect("disconnected by the service: maintenance");
        erin.expect("disconnected: ");
        let status = erin.exit_status();
        assert_eq!(status.exit_code(), 1, "{status:?}");
        // Everything it printed after the kick, up to its exit: no reconnect attempt.
        let output = strip_ansi(&erin.raw());
        let (_, after) = output
            .rsplit_once("disconnected by the service: maintenance")
            .expect("printed above");
        assert!(
            !after.contains("reconnecting") && !after.contains("connected to server"),
            "{after}"
        );
    })
    .await?;
    drop(cluster);
    Ok(())
}

/// A script over TLS: an https:// route (the test CA from `CIM_CA_FILE`), `--tls on` to the
/// server's TLS listener; without the CA the route is not trusted and the client says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_chats_over_tls() -> anyhow::Result<()> {
    let pki = cim_tests::tls::TestPki::new();
    let (server_tls, route_tls) = (pki.tls_config(), pki.tls_config());
    let cluster = Cluster::builder()
        .servers(1)
        .server_config(move |c| {
            c.tls_listen = Some("127.0.0.1:0".into());
            c.tls = server_tls.clone();
        })
        .route_config(move |c| c.tls = route_tls.clone())
        .client_tls(pki.client_tls())
        .start()
        .await?;
    let route = cluster.route_url();
    assert!(route.starts_with("https://"), "{route}");
    let tls_addr = cluster.servers[0]
        .tls_addr
        .expect("tls listener")
        .to_string();
    let mut bob = cluster.user("bob", cim_sdk::Transport::Tcp).await?;
    let dir = tempfile::tempdir()?;

    let run = |ca: Option<&Path>| {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.args(client_args(&route, "carol", dir.path()))
            .args(["--tls", "on"])
            .env("CIM_PASSWORD", "carol-password")
            .env_remove("CIM_CA_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(ca) = ca {
            cmd.env("CIM_CA_FILE", ca);
        }
        cmd.spawn()
    };

    // Without the CA: the https route is refused, clearly, and the client fails.
    let out = tokio::time::timeout(DEADLINE, run(None)?.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("register failed"), "{stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains("--ca-file"),
        "{stderr}"
    );

    let script = run(Some(&pki.ca_file))?;
    let stdout = script_output(script, b"@bob hi over tls\n").await?;
    assert!(stdout.contains(&format!("({tls_addr})")), "{stdout}");
    assert!(stdout.contains("you → bob: hi over tls"), "{stdout}");
    let push = bob.next_push().await?;
    assert_eq!(push.messages[0].body, "hi over tls");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_groups_history_and_unread_counts() -> anyhow::Result<()> {
    let cluster = Cluster::builder().start().await?;
    let route = cluster.routes[0].url();
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?];
    let paths: Vec<_> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    tokio::task::spawn_blocking(move || {
        let mut alice = Pty::spawn(
            "alice",
            &client_args(&route, "alice", &paths[0]),
            "alice-password",
            &paths[0],
        );
        alice.expect("connected to server");
        let mut bob = Pty::spawn(
            "bob",
            &client_args(&route, "bob", &paths[1]),
            "bob-password",
            &paths[1],
        );
        bob.expect("connected to server");

        // Created with bob, named by his user name (he is online).
        alice.line(":gnew team bob");
        alice.expect("created team(");
        let id = alice.expect(")");
        let id: u64 = id.trim_end_matches(')').parse().expect("a group id");
        alice.expect("with 2 members");
        alice.line(":gnew bad nobody-like-this");
        alice.expect("cannot find user nobody-like-this");

        // Bob lists it (and so knows its name), then gets alice's message labelled by it.
        bob.line(":groups");
        bob.expect("you are in 1 group:");
        let list = bob.until_prompt();
        assert!(list.contains(&format!("{id}  team  2 members")), "{list}");
        alice.line(&format!(":g {id} hello team"));
        let seen = alice.expect(&format!("you → team({id}): hello team"));
        assert!(has_time_stamp(&seen, "you → team("), "{seen:?}");
        bob.expect(&format!("alice → team({id}): hello team"));
        alice.line(":g 999999 nobody");
        alice.expect("not sent");

        alice.line(&format!(":gmembers {id}"));
        alice.expect(&format!("team({id}): 2 members:"));
        let members = alice.until_prompt();
        assert!(
            members.contains("owner") && members.contains("bob"),
            "{members}"
        );

        // Unread until bob reads the history; then none, in :unread and :info alike.
        bob.line(":unread");
        bob.expect("unread message");
        let unread = bob.until_prompt();
        assert!(unread.contains(&format!("team({id})")), "{unread}");
        bob.line(&format!(":hist #{id} 5"));
        bob.expect(&format!("with team({id}):"));
        let hist = bob.until_prompt();
        assert!(hist.contains("alice: hello team"), "{hist}");
        bob.line(":unread");
        bob.expect("no unread messages.");
        bob.line(":info");
        bob.expect("unread:  0");

        // A private conversation by name: alice's history with bob, hers shown as "you".
        bob.line("@alice psst");
        alice.expect("bob → you: psst");
        alice.line(":hist bob");
        alice.expect("last 1 message with bob:");
        alice.expect("bob: psst");

        // Leaving: bob no longer gets the group's messages, nor may send there.
        bob.line(&format!(":gleave {id}"));
        bob.expect(&format!("left team({id})"));
        bob.line(&format!(":g {id} still here?"));
        bob.expect(&format!("not sent: you are not a member of group {id}"));
        alice.line(":q!");
        alice.expect("logged out, bye");
        bob.line(":q!");
        bob.expect("logged out, bye");
    })
    .await?;
    Ok(())
}
