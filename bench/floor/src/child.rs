//! Child processes of a run and the line protocol the parent drives them with.
//!
//! Every child is SIGKILLed and reaped when its [`Children`] set is dropped (a finished run, an
//! error, a panic), and gets SIGKILL from the kernel if its parent dies first
//! ([`sys::die_with_parent`]). The parent talks to a child over its stdin and reads lines from
//! its stdout: a reader thread per child feeds one channel, and lines wait in a queue per child
//! until the parent asks for them, so a child may run ahead of the others. The children's
//! stderr is the parent's, for progress and errors.

use crate::{
    bail,
    error::{Context as _, Error, Result},
    sys,
};
use std::{
    collections::VecDeque,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant},
};

/// A line from child `from`, or its stdout closing (`None`: it exited or crashed).
struct Line {
    from: usize,
    line: Option<String>,
}

struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines read and not yet asked for; `None` is the end of its output.
    queued: VecDeque<Option<String>>,
    /// Its output ended (the `None` may still be queued).
    eof: bool,
}

/// The child processes of one scenario.
pub struct Children {
    procs: Vec<Proc>,
    tx: Sender<Line>,
    rx: Receiver<Line>,
}

impl Default for Children {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            procs: Vec::new(),
            tx,
            rx,
        }
    }
}

impl Children {
    /// Starts `cmd` (stdin and stdout piped, stderr inherited) and returns its index.
    pub fn spawn(&mut self, name: impl Into<String>, mut cmd: Command) -> Result<usize> {
        let name = name.into();
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        sys::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", cmd.get_program().display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let from = self.procs.len();
        let mut queued = VecDeque::new();
        let eof = stdout.is_none();
        match stdout {
            Some(stdout) => {
                let tx = self.tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if tx
                            .send(Line {
                                from,
                                line: Some(line),
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = tx.send(Line { from, line: None });
                });
            }
            None => queued.push_back(None),
        }
        self.procs.push(Proc {
            name,
            child,
            stdin,
            queued,
            eof,
        });
        Ok(from)
    }

    /// Fails if any child has exited (for waits that have no line to expect).
    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.child.try_wait().context("checking a child")? {
                bail!("{} exited early ({status}; its errors are above)", p.name);
            }
        }
        Ok(())
    }

    /// Writes one line to child `i`'s stdin.
    pub fn send(&mut self, i: usize, line: &str) -> Result<()> {
        let p = &mut self.procs[i];
        let stdin = p
            .stdin
            .as_mut()
            .ok_or_else(|| Error::new(format!("{}: stdin closed", p.name)))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}", p.name))
    }

    /// Waits for the next line of each child in `who` to be `WORD …` and returns the rest of
    /// each (after the word and a space), in the order of `who`. Fails when one of them says
    /// something else or exits first, when any child fails, or when `timeout` passes.
    pub fn expect(&mut self, who: &[usize], word: &str, timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut got: Vec<Option<String>> = vec![None; who.len()];
        loop {
            for (slot, &i) in who.iter().enumerate() {
                if got[slot].is_some() {
                    continue;
                }
                let Some(line) = self.procs[i].queued.pop_front() else {
                    continue;
                };
                let name = self.procs[i].name.clone();
                let Some(line) = line else {
                    let (_, status) = self.reap(i);
                    bail!(
                        "{name} exited while `{word}` was awaited ({status}; its errors are above)"
                    );
                };
                got[slot] = Some(match line.split_once(' ') {
                    Some((w, rest)) if w == word => rest.to_owned(),
                    None if line == word => String::new(),
                    _ => bail!("{name} said `{line}`, `{word}` was awaited"),
                });
            }
            if got.iter().all(Option::is_some) {
                return Ok(got.into_iter().flatten().collect());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.receive(msg)?,
                Err(RecvTimeoutError::Timeout) => {
                    let waiting: Vec<&str> = (who.iter().zip(&got))
                        .filter(|(_, g)| g.is_none())
                        .map(|(&i, _)| self.procs[i].name.as_str())
                        .collect();
                    bail!("no `{word}` within {timeout:?} from {}", waiting.join(", "));
                }
                Err(RecvTimeoutError::Disconnected) => bail!("child output channel closed"),
            }
        }
    }

    /// Queues a line; a child whose output ends with a failure fails the run at once.
    fn receive(&mut self, msg: Line) -> Result<()> {
        if msg.line.is_none() {
            self.procs[msg.from].eof = true;
            let (ok, status) = self.reap(msg.from);
            if !ok {
                bail!(
                    "{} failed ({status}; its errors are above)",
                    self.procs[msg.from].name
                );
            }
        }
        self.procs[msg.from].queued.push_back(msg.line);
        Ok(())
    }

    /// Closes every child's stdin (their signal to finish), waits up to `timeout` until each
    /// has ended its output (it exits right after), and fails unless all exited with success
    /// and said nothing more.
    pub fn finish(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for p in &mut self.procs {
            p.stdin = None;
        }
        while let Some(i) = self.procs.iter().position(|p| !p.eof) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => self.receive(msg)?,
                Err(_) => bail!("{} did not exit within {timeout:?}", self.procs[i].name),
            }
        }
        for p in &mut self.procs {
            if let Some(Some(line)) = p.queued.pop_front() {
                bail!("{} said `{line}` while finishing", p.name);
            }
            let status = p.child.wait().context("waiting for a child")?;
            if !status.success() {
                bail!("{} failed: {status}", p.name);
            }
        }
        Ok(())
    }

    /// Whether child `i` exited with success, and its status as text, once it is gone
    /// (killed if it lingers after closing its stdout).
    fn reap(&mut self, i: usize) -> (bool, String) {
        let p = &mut self.procs[i];
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match p.child.try_wait() {
                Ok(Some(status)) => return (status.success(), status.to_string()),
                // Its stdout closes just before the exit: no event to wait on, poll briefly.
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = p.child.kill();
                    return match p.child.wait() {
                        Ok(status) => (false, format!("killed: {status}")),
                        Err(e) => (false, format!("lost: {e}")),
                    };
                }
            }
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.stdin = None;
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }
}
