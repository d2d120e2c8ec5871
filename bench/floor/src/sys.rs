//! The few libc calls the floor needs, each wrapped once so the scenarios stay safe code:
//! epoll, the monotonic clock, this process's CPU time, another process's CPU ticks, the
//! open-file limit and the parent-death signal of child processes.

use crate::error::{Context as _, Error, Result};
use std::{
    io,
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    process::Command,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

/// `CLOCK_MONOTONIC` in nanoseconds. The clock is system-wide, so timestamps taken in different
/// processes on one machine compare directly (a send time in one, a receipt in another).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec that clock_gettime fills in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC exists on every Linux; a failure would mean a broken libc.
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of this process (every thread), user and system, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cpu {
    pub user_us: u64,
    pub sys_us: u64,
}

impl Cpu {
    pub fn total_us(&self) -> u64 {
        self.user_us + self.sys_us
    }

    /// What was used from `earlier` to `self`.
    pub fn since(&self, earlier: Cpu) -> Cpu {
        Cpu {
            user_us: self.user_us.saturating_sub(earlier.user_us),
            sys_us: self.sys_us.saturating_sub(earlier.sys_us),
        }
    }

    pub fn add(&self, other: Cpu) -> Cpu {
        Cpu {
            user_us: self.user_us + other.user_us,
            sys_us: self.sys_us + other.sys_us,
        }
    }
}

/// `getrusage(RUSAGE_SELF)`: on Linux its total (user + system) is the scheduler's nanosecond
/// accounting, not a count of 10 ms ticks, so short spans are measurable; only the split
/// between user and system follows the ticks (a short span may show all of it as system).
pub fn self_cpu() -> Cpu {
    // SAFETY: rusage is plain data (integers and timevals); all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, exclusively borrowed rusage that getrusage fills in.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_SELF) failed");
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    Cpu {
        user_us: us(ru.ru_utime),
        sys_us: us(ru.ru_stime),
    }
}

/// Clock ticks per second of /proc's CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

/// User + system CPU of process `pid` (all its threads), in clock ticks, from
/// `/proc/PID/stat` (fields 14 and 15).
pub fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest)
        .ok_or_else(|| Error::new(format!("{path}: unexpected format")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| Error::new(format!("{path}: no field {}", i + 3)))
    };
    Ok(field(11)? + field(12)?)
}

/// Raises this process's soft open-file limit so that `need` files fit, up to the hard limit;
/// fails with the limits when even the hard one is too low.
pub fn ensure_open_files(need: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, exclusively borrowed rlimit that getrlimit fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max < need {
        return Err(Error::new(format!(
            "{need} open files needed, the hard limit is {} (raise it, or use fewer connections per process)",
            lim.rlim_max
        )));
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit, only read by setrlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(())
}

/// Sets the accept queue of a listening socket to `backlog` (a second `listen` only changes
/// it; the kernel caps it at net.core.somaxconn). std listens with 128, which thousands of
/// connects at once overflow, and each SYN dropped then costs its client a 1 s retransmit.
pub fn set_backlog(listener: &TcpListener, backlog: i32) -> Result<()> {
    // SAFETY: listen takes no pointers; `listener` owns the descriptor for the call.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error()).context("listen");
    }
    Ok(())
}

/// `SO_LINGER` on with a zero timeout: closing `stream` resets the connection instead of
/// leaving it in TIME_WAIT, whose 60 s would hold one ephemeral port per connection of a run
/// and slow or starve the connects of the next (10,000 per broadcast).
pub fn reset_on_close(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct of the size passed, only read by setsockopt.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setsockopt(SO_LINGER)");
    }
    Ok(())
}

/// Makes the child of `cmd` get SIGKILL when the thread that spawns it exits (the parent
/// failed, was killed, or returned without dropping its guards), so no child outlives a run.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec; it calls only prctl and
    // getppid, both async-signal-safe, and allocates nothing (`from_raw_os_error` does not).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would kill us.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// An epoll instance (level-triggered registrations, a `u64` token per file).
pub struct Epoll {
    fd: OwnedFd,
}

/// One readiness report: the registration's token and its event bits.
pub type Event = libc::epoll_event;

/// An empty event buffer for [`Epoll::wait`].
pub fn events(n: usize) -> Vec<Event> {
    vec![libc::epoll_event { events: 0, u64: 0 }; n]
}

/// The token of an event (a copy: the struct is packed on x86-64).
pub fn token(ev: &Event) -> u64 {
    ev.u64
}

/// Whether epoll_pwait2 (nanosecond timeouts, Linux 5.11) turned out to be missing.
static NO_PWAIT2: AtomicBool = AtomicBool::new(false);

impl Epoll {
    pub fn new() -> Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: `fd` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Registers `fd` for input (level-triggered) under `token`.
    pub fn add_input(&self, fd: RawFd, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; bad descriptors
        // are reported through the return value.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl(ADD)");
        }
        Ok(())
    }

    pub fn delete(&self, fd: RawFd) -> Result<()> {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
        let rc = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl(DEL)");
        }
        Ok(())
    }

    /// Waits up to `timeout` for events into `out`; returns how many arrived (0 on timeout or
    /// a signal). Nanosecond timeouts through epoll_pwait2, else milliseconds rounded up.
    pub fn wait(&self, out: &mut [Event], timeout: Duration) -> Result<usize> {
        let max = out.len().min(i32::MAX as usize) as libc::c_int;
        let rc = if NO_PWAIT2.load(Relaxed) {
            self.wait_ms(out, max, timeout)
        } else {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `out` is valid for `max` events, `ts` lives through the call, and a
            // null sigmask means the thread's mask is kept.
            let rc = unsafe {
                libc::epoll_pwait2(
                    self.fd.as_raw_fd(),
                    out.as_mut_ptr(),
                    max,
                    &ts,
                    std::ptr::null(),
                )
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
                NO_PWAIT2.store(true, Relaxed);
                self.wait_ms(out, max, timeout)
            } else {
                rc
            }
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err).context("epoll_wait");
        }
        Ok(rc as usize)
    }

    fn wait_ms(&self, out: &mut [Event], max: libc::c_int, timeout: Duration) -> libc::c_int {
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `out` is valid for `max` events.
        unsafe { libc::epoll_wait(self.fd.as_raw_fd(), out.as_mut_ptr(), max, ms) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_and_cpu_move_forward() {
        let (t0, c0) = (now_ns(), self_cpu());
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(now_ns() > t0);
        assert!(self_cpu().total_us() >= c0.total_us());
        assert!(process_cpu_ticks(std::process::id()).is_ok());
        assert!(clock_ticks_per_sec() > 0);
    }

    #[test]
    fn epoll_times_out_and_reports_input() {
        let ep = Epoll::new().unwrap();
        let mut evs = events(4);
        assert_eq!(ep.wait(&mut evs, Duration::from_millis(1)).unwrap(), 0);
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        ep.add_input(a.as_raw_fd(), 7).unwrap();
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert_eq!(ep.wait(&mut evs, Duration::from_secs(5)).unwrap(), 1);
        assert_eq!(token(&evs[0]), 7);
        ep.delete(a.as_raw_fd()).unwrap();
    }
}
