//! Shared foundation of the cluster's processes: tokens, ids, configuration loading,
//! internal-call helpers, and the two backend traits with their implementations. The client
//! wire contract (protobuf types, frame codec, client-chosen ids) is the `cim-proto` crate,
//! re-exported here under its old paths (`pb`, `proto::cim`, `codec`, `ids`).
//!
//! # Layout
//! - [`proto`]: `cim` is cim-proto's `pb` (types of `proto/cim.proto`); `cim::cluster` is
//!   generated here from `proto/cluster.proto` (internal calls).
//! - [`codec`]: cim-proto's frame codec (varint32-delimited protobuf framing for TCP).
//! - [`token`]: HMAC-signed connect and session tokens (stateless, bound to user and server).
//! - [`secret`]: the keys derived from the cluster secret (HKDF: token signing, internal
//!   auth), rotation through previous secrets, and the proofs internal calls carry.
//! - [`keys`]: the Redis key layout, in one place.
//! - [`limit`]: keyed rate limits (a token bucket per key, governor), pruned of idle keys.
//! - [`store`]: the shared-state trait ([`store::StateStore`]) and its Redis and in-memory
//!   implementations.
//! - [`registry`]: the service-registry trait ([`registry::Registry`]) and its etcd and
//!   in-memory implementations.
//! - [`backend`]: one config section for Redis + etcd, connecting to both, or the in-memory
//!   pair ([`backend::Backends::memory`]).
//! - [`cli`]: command-line plumbing shared by the binaries (backend flags, binding listeners,
//!   waiting for ctrl-c / SIGTERM).
//! - [`cluster`]: authenticated protobuf-over-HTTP calls between cim processes.
//! - [`config`]: layered configuration (defaults, file, environment, flags) and logging setup.
//! - [`events`]: presence events (online / offline) and their ids.
//! - [`ids`]: server instance ids and session ids, plus cim-proto's message ids and name
//!   rules; [`time`]: clock helpers.
//! - [`tls`]: TLS for client-facing listeners (reloadable certificate, handshake deadline,
//!   an HTTPS listener for axum) and for clients (system roots plus an extra CA file).
//! - [`procinfo`]: this process's resident memory, CPU time and open descriptors (for
//!   `/healthz` and `/metrics`).
//! - [`metrics`]: what `/metrics` shares: the answer, process metrics, bounded label tables.
//! - `arb` (feature `test-support`): cim-proto's proptest strategies of the wire types.

#[cfg(any(test, feature = "test-support"))]
pub use cim_proto::arb;
pub mod backend;
pub mod cli;
pub mod cluster;
pub use cim_proto::codec;
pub mod config;
pub mod events;
pub mod ids;
pub mod keys;
pub mod limit;
pub mod metrics;
pub mod procinfo;
pub mod proto;
pub mod registry;
pub mod secret;
pub mod store;
pub mod time;
pub mod tls;
pub mod token;

pub use proto::cim as pb;
