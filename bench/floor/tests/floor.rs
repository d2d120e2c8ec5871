//! The floor's scenarios at tiny sizes, through the built binary (it runs itself as the client
//! and relay processes): every message arrives and every figure is there. Never speed.

use cim_floor::{
    broadcast::{self, BroadcastOpts},
    redis::{self, RedisOpts},
    relay::{self, Load, RelayOpts, Scenario},
};
use std::{path::PathBuf, process::Command, time::Duration};

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cim-floor"))
}

/// redis-server is a requirement of this suite (CI installs it), not an optional extra.
fn require_redis_server() {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join("redis-server").is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "redis-server is not on PATH: install it (Debian: apt-get install redis-server, or \
         deploy/install-deps.sh --tests); the redis floor test does not skip without it"
    );
}

#[test]
fn broadcast_reaches_every_connection() {
    let r = broadcast::run(&BroadcastOpts {
        connections: 20,
        messages: 2,
        interval: Duration::ZERO,
        per_process: 8,
        ..BroadcastOpts::new(exe())
    })
    .expect("broadcast");
    assert_eq!(r.client_processes, 3);
    assert_eq!(
        (r.deliveries, r.expected_deliveries, r.missing),
        (40, 40, 0)
    );
    assert_eq!(r.per_message.len(), 2);
    for m in &r.per_message {
        assert!(m.time_to_last_ms > 0.0, "{m:?}");
    }
    assert!(r.time_to_last_median_ms > 0.0 && r.time_to_last_max_ms >= r.time_to_last_median_ms);
    assert!(r.writer_cpu_us_per_delivery > 0.0, "{r:?}");
    assert!(r.clients_cpu_us_per_delivery.is_finite());
}

#[test]
fn relay_delivers_every_message_at_a_rate_and_flat_out() {
    let scenario = |name: &str, load| Scenario {
        name: name.to_owned(),
        pairs: 3,
        load,
        duration: Duration::from_millis(300),
    };
    let r = relay::run(&RelayOpts {
        scenarios: vec![
            scenario("rate", Load::Rate(300.0)),
            scenario("flat", Load::Flat { window: 4 }),
        ],
        client_processes: 2,
        ..RelayOpts::new(exe(), Duration::from_millis(300))
    })
    .expect("relay");
    assert_eq!(r.0.len(), 2);
    for (name, s) in &r.0 {
        assert_eq!(s.client_processes, 2, "{name}");
        assert!(s.sent > 0, "{name}: {s:?}");
        assert_eq!(
            (s.delivered, s.lost, s.out_of_order),
            (s.sent, 0, 0),
            "{name}"
        );
        let l = &s.latency_us;
        assert!(l.p50.is_some_and(|v| v > 0.0), "{name}: {l:?}");
        assert!(l.p99 >= l.p50 && l.max >= l.p99, "{name}: {l:?}");
        assert!(s.throughput_per_sec > 0.0, "{name}");
        assert!(s.relay_cpu_us_per_message > 0.0, "{name}: {s:?}");
        assert!(
            s.all_cpu_us_per_message >= s.relay_cpu_us_per_message,
            "{name}"
        );
        assert!(s.relay_reads_per_message > 0.0 && s.relay_writes_per_message > 0.0);
    }
    // 300 msg/s for 0.3 s: about 90, never more than the schedule allows.
    let rate = r.get("rate").expect("rate scenario");
    assert!(rate.sent <= 91, "{rate:?}");
    assert_eq!(rate.mode, "rate");
    assert_eq!(r.get("flat").expect("flat scenario").window, Some(4));
}

#[test]
fn redis_stores_and_removes_every_message() {
    require_redis_server();
    let r = redis::run(&RedisOpts {
        messages: 1000,
        keys: 50,
        pipeline: 64,
        ..RedisOpts::default()
    })
    .expect("redis");
    assert_eq!((r.messages, r.keys), (1000, 50));
    assert!(!r.redis_version.is_empty());
    for phase in [&r.hset, &r.hdel, &r.total] {
        // 1,000 messages may take less than one 10 ms tick of Redis CPU: present, not > 0.
        assert!(
            phase.cpu_ms >= 0.0 && phase.cpu_us_per_message.is_finite(),
            "{phase:?}"
        );
        assert!(
            phase.secs > 0.0 && phase.messages_per_sec > 0.0,
            "{phase:?}"
        );
    }
    assert_eq!(r.total.cpu_ms, r.hset.cpu_ms + r.hdel.cpu_ms);
}

/// `all --json` as deploy/baseline.sh runs it: one JSON object with the fields its summary
/// reads.
#[test]
fn all_prints_one_json_object_with_the_baseline_fields() {
    require_redis_server();
    let out = Command::new(exe())
        .args(["all", "--json", "--connections", "10", "--messages", "2"])
        .args([
            "--interval",
            "0ms",
            "--duration",
            "300ms",
            "--pairs",
            "2",
            "--rate",
            "200",
        ])
        .args([
            "--flat-pairs",
            "2",
            "--window",
            "2",
            "--redis-messages",
            "500",
        ])
        .output()
        .expect("running cim-floor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let num = |path: &str| {
        v.pointer(path)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{path} missing in {v}"))
    };
    assert_eq!(num("/broadcast/deliveries"), 20.0);
    assert!(num("/broadcast/writer_cpu_us_per_delivery") > 0.0);
    assert!(num("/broadcast/time_to_last_median_ms") > 0.0);
    for s in ["unloaded", "rate", "flat"] {
        assert_eq!(num(&format!("/relay/{s}/lost")), 0.0, "{s}");
        assert!(num(&format!("/relay/{s}/latency_us/p50")) > 0.0, "{s}");
        assert!(num(&format!("/relay/{s}/latency_us/p99")) > 0.0, "{s}");
        assert!(
            num(&format!("/relay/{s}/relay_cpu_us_per_message")) > 0.0,
            "{s}"
        );
        assert!(num(&format!("/relay/{s}/throughput_per_sec")) > 0.0, "{s}");
    }
    assert!(num("/redis/total/cpu_us_per_message") >= 0.0);
    assert!(num("/redis/hset/cpu_us_per_message") >= 0.0);
    assert!(num("/duration_secs") > 0.0);
}

#[test]
fn bad_flags_are_errors_not_panics() {
    for args in [
        &["broadcast", "--connections", "0"][..],
        &["relay", "--duration", "soon"],
        &["relay", "--duration", "0s"],
        &[
            "redis",
            "--redis-server",
            "/nonexistent/redis-server",
            "--redis-messages",
            "10",
        ],
    ] {
        let out = Command::new(exe())
            .args(args)
            .output()
            .expect("running cim-floor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.trim().is_empty(), "{args:?}: no message");
    }
}
