//! Shared foundation of the cluster's processes: tokens, ids, configuration loading,
//! internal-call helpers, and the role traits of the shared state with their implementations.
//! The client wire contract (protobuf types, frame codec, client-chosen ids, the HTTP API's
//! bodies) is the `cim-proto` crate; [`pb`] is the cluster's view of the protobuf types: the
//! contract's (`cim_proto::pb`) plus `pb::cluster`, the bodies of internal calls.
//!
//! # Layout
//! - [`proto`]: `cim` is cim-proto's `pb` (types of `proto/cim.proto`) with `cim::cluster`,
//!   generated here from `proto/cluster.proto` (internal calls); [`pb`] names it.
//! - [`token`]: HMAC-signed connect and session tokens (stateless, bound to user and server).
//! - [`secret`]: the keys derived from the cluster secret (HKDF: token signing, internal
//!   auth), rotation through previous secrets, and the proofs internal calls carry.
//! - [`keys`]: the Redis key layout, in one place.
//! - [`limit`]: keyed rate limits (a token bucket per key, governor), pruned of idle keys.
//! - [`store`]: the shared state's role traits (a connection server holds
//!   [`store::ServerStore`], a route [`store::RouteStore`]) and their Redis and in-memory
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
//! - [`ids`]: server instance ids and session ids (message ids are cim-proto's);
//!   [`time`]: clock helpers.
//! - [`tls`]: TLS for client-facing listeners (reloadable certificate, handshake deadline,
//!   an HTTPS listener for axum); the client side is cim-sdk's.
//! - [`procinfo`]: this process's resident memory, CPU time and open descriptors (for
//!   `/healthz` and `/metrics`).
//! - [`metrics`]: what `/metrics` shares: the answer, process metrics, bounded label tables.

pub mod backend;
pub mod cli;
pub mod cluster;
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
