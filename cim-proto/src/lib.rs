//! cim's client wire contract: what a client and the cluster must agree on, in a crate that is
//! cheap to depend on (no backends, no server, no HTTP stack), so every client-side crate can.
//!
//! # Layout
//! - [`pb`]: the types generated from `proto/cim.proto` (prost), with serde implementations
//!   following the proto3 JSON mapping (pbjson, used by WebSocket text frames).
//! - [`api`]: the JSON bodies of the route's HTTP API and its error codes ([`api::ErrorCode`]),
//!   with OpenAPI schemas behind feature `openapi`.
//! - [`codec`]: varint32-delimited protobuf framing for TCP, with a maximum frame size.
//! - [`ids`]: message ids and the rules for ids and names clients choose (message ids,
//!   channel names).
//! - `tls` (feature `tls`): what both sides of TLS share (provider, PEM files, errors).
//! - `arb` (feature `arb`): proptest strategies of the wire types, for property tests.
//!
//! cim-common re-exports these under their old paths (`cim_common::{pb, codec, ids}`).

pub mod api;
#[cfg(any(test, feature = "arb"))]
pub mod arb;
pub mod codec;
pub mod ids;
pub mod pb;
#[cfg(feature = "tls")]
pub mod tls;
