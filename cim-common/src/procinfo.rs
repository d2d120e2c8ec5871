//! Resource usage of this process (resident memory, CPU time, open file descriptors), for the
//! `process_*` metrics of `/metrics` and the `/healthz` answers of servers and routes, which
//! the load generator (`cim-bench`) reads before and after a run to compute memory per
//! connection and CPU per message.
//!
//! Linux only: read from `/proc/self/stat` (CPU) and `/proc/self/statm` (memory), or those of
//! another process ([`usage_of`]: the load generator reads Redis's CPU time this way). Elsewhere,
//! or when `/proc` is not mounted, [`self_usage`] is `None` and `/healthz` says `null`.

use serde::Serialize;

/// Resource usage of the whole process (every thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Resident set size.
    pub rss_bytes: u64,
    /// User plus system CPU time since the process started.
    pub cpu_ms: u64,
}

/// Clock ticks per second of the CPU times in `/proc/*/stat` (`USER_HZ`). The kernel reports
/// in this unit whatever its internal tick rate; it is 100 on every architecture cim builds
/// for (reading `sysconf(_SC_CLK_TCK)` would need `libc` and `unsafe`, which cim forbids).
const USER_HZ: u64 = 100;

/// Page size assumed when [`page_size`] cannot read it (`/proc/self/statm` counts pages).
const DEFAULT_PAGE_SIZE: u64 = 4096;

/// This process's usage now, or `None` where `/proc` cannot tell.
pub fn self_usage() -> Option<Usage> {
    usage_in("/proc/self")
}

/// The usage of process `pid` on this machine (the load generator reads Redis's), or `None`
/// where `/proc` cannot tell (no such process, not Linux).
pub fn usage_of(pid: u32) -> Option<Usage> {
    usage_in(&format!("/proc/{pid}"))
}

/// The usage of the process whose `/proc` directory is `dir`.
fn usage_in(dir: &str) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let statm = std::fs::read_to_string(format!("{dir}/statm")).ok()?;
    Some(Usage {
        rss_bytes: parse_statm_resident(&statm)? * page_size(),
        cpu_ms: parse_stat_cpu_ticks(&stat)? * 1000 / USER_HZ,
    })
}

/// Open file descriptors of this process (entries of `/proc/self/fd`), or `None` where
/// `/proc` cannot tell. For the `process_open_fds` metric.
pub fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory handle itself is one of the entries while it is read.
    Some((dir.count() as u64).saturating_sub(1))
}

/// The page size: the `KernelPageSize` of this process's first mapping in
/// `/proc/self/smaps` (read once, only up to that line), else 4 KiB. cim uses no huge pages,
/// so every mapping has the base page size.
fn page_size() -> u64 {
    use std::io::BufRead;
    static PAGE_SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE_SIZE.get_or_init(|| {
        std::fs::File::open("/proc/self/smaps")
            .ok()
            .and_then(|file| {
                std::io::BufReader::new(file)
                    .lines()
                    .map_while(Result::ok)
                    .find(|l| l.starts_with("KernelPageSize:"))
            })
            .and_then(|line| parse_kib_line(&line))
            .map_or(DEFAULT_PAGE_SIZE, |kib| kib * 1024)
    })
}

/// `KernelPageSize:        4 kB` → 4.
fn parse_kib_line(line: &str) -> Option<u64> {
    let mut words = line.split_whitespace().skip(1);
    let n = words.next()?.parse().ok()?;
    (words.next()? == "kB").then_some(n)
}

/// The second field of `/proc/self/statm`: resident pages.
fn parse_statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// `utime + stime` (fields 14 and 15) of `/proc/self/stat`, in clock ticks. The second field
/// is the command name in parentheses and may itself contain spaces and parentheses, so the
/// fields are counted from after the *last* `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": field 3 (state) is index 0, so field 14 is index 11.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_names() {
        let stat = "4242 (cim (a) b) S 1 4242 4242 0 -1 4194560 2187 0 0 0 \
                    150 37 0 0 20 0 9 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(187));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn parses_statm_and_kib_lines() {
        assert_eq!(
            parse_statm_resident("5000 1200 300 10 0 900 0\n"),
            Some(1200)
        );
        assert_eq!(parse_statm_resident("5000"), None);
        assert_eq!(parse_kib_line("KernelPageSize:        4 kB"), Some(4));
        assert_eq!(parse_kib_line("KernelPageSize:        64 kB"), Some(64));
        assert_eq!(parse_kib_line("KernelPageSize: 4"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process_and_sees_memory_grow() {
        let before = self_usage().expect("/proc is readable on Linux");
        assert!(before.rss_bytes > 0);
        // Touch 32 MiB so the resident size must grow by most of it.
        let block = vec![1u8; 32 << 20];
        let after = self_usage().unwrap();
        assert!(block.iter().step_by(4096).all(|&b| b == 1));
        assert!(
            after.rss_bytes >= before.rss_bytes + (16 << 20),
            "{before:?} → {after:?}"
        );
        assert!(after.cpu_ms >= before.cpu_ms);
    }

    #[test]
    fn reads_a_process_by_pid() {
        let by_pid = usage_of(std::process::id()).expect("this process by its pid");
        assert!(by_pid.rss_bytes > 0);
        // Pids are at most 2^22 on Linux: this one cannot exist.
        assert_eq!(usage_of(u32::MAX), None);
    }
}
