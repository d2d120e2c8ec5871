//! Microbenchmarks of a channel fan-out's CPU work in the route, on the functions routing
//! itself calls ([`group_by_server`], [`group_deliveries`]):
//!
//! - `fanout_group`: N recipients' routes grouped by live server (with the at-most-once
//!   `seen` set), N = 1,000 / 10,000 / 100,000 spread over 2 and 10 servers;
//! - `fanout_push`: from those groups, the per-server push requests of one group message,
//!   built and protobuf-encoded as `ClusterClient::call` sends them.
//!
//! Routing does this per page of channel members (1,000), so N = 1,000 is one page and the
//! larger N show how the work and the `seen` set scale with one call. (Group messages to
//! everyone online no longer group anything: one `everyone` push per server.)
//! Throughput is in recipients. `cargo bench -p cim-route --bench fanout`; `cargo test` runs
//! each once, as a smoke check.

use cim_common::{
    pb::{Message, MessageKind},
    registry::{Members, ServiceInfo},
    store::RouteEntry,
};
use cim_route::routing::{group_by_server, group_deliveries, ServerGroups};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use prost::Message as _;
use std::{collections::HashSet, hint::black_box, sync::Arc};

const RECIPIENTS: [u64; 3] = [1_000, 10_000, 100_000];
const SERVERS: [usize; 2] = [2, 10];

/// `count` live servers, sorted by id as the registry watch keeps them.
fn servers(count: usize) -> Members {
    let mut list: Vec<ServiceInfo> = (0..count)
        .map(|i| ServiceInfo {
            id: format!("server-{i:02}"),
            internal_addr: format!("127.0.0.1:{}", 9100 + i),
            ..Default::default()
        })
        .collect();
    list.sort_by(|a, b| a.id.cmp(&b.id));
    Arc::new(list)
}

/// `n` routes spread round-robin over the servers, as round-robin assignment spreads users,
/// with session ids shaped like real ones (32 hex digits).
fn routes(n: u64, servers: &Members) -> Vec<RouteEntry> {
    (0..n)
        .map(|i| RouteEntry {
            user_id: 1_000 + i,
            server_id: servers[i as usize % servers.len()].id.clone(),
            session: format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
        })
        .collect()
}

/// One group message with a 64-byte body, from a sender who is not among the recipients.
fn group_message() -> Message {
    Message {
        id: "01J9Z8Q4W6X2M3N5P7R8S9T0VW".into(),
        sender_id: 7,
        sender_name: "sender".into(),
        kind: MessageKind::Group as i32,
        body: "x".repeat(64),
        timestamp_ms: 1_730_000_000_000,
        ..Default::default()
    }
}

fn grouping(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout_group");
    for k in SERVERS {
        let live = servers(k);
        for n in RECIPIENTS {
            let all = routes(n, &live);
            group.throughput(Throughput::Elements(n));
            group.bench_function(format!("{n}_users/{k}_servers"), |b| {
                b.iter_batched(
                    // group_by_server consumes the routes, as routing does a page's;
                    // the copy for each iteration is made outside the timing.
                    || all.clone(),
                    |routes| {
                        let mut seen = HashSet::new();
                        black_box(group_by_server(&live, routes, &mut seen))
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

fn push_requests(c: &mut Criterion) {
    let message = group_message();
    let mut group = c.benchmark_group("fanout_push");
    for k in SERVERS {
        let live = servers(k);
        for n in RECIPIENTS {
            let ServerGroups { per_server, stale } =
                group_by_server(&live, routes(n, &live), &mut HashSet::new());
            assert!(stale.is_empty());
            group.throughput(Throughput::Elements(n));
            group.bench_function(format!("{n}_users/{k}_servers"), |b| {
                b.iter(|| {
                    for (_, users) in per_server.values() {
                        let (_, deliveries) = group_deliveries([&message], users);
                        let request = cim_common::pb::cluster::PushRequest { deliveries };
                        black_box(request.encode_to_vec());
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, grouping, push_requests);
criterion_main!(benches);
