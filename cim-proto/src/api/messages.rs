//! Answers of messages sent over HTTP: to one user, and to many (group, broadcast, channel).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrivateSent {
    pub id: String,
    /// `delivered` or `stored` (the receiver is offline and gets it from their inbox at their
    /// next connection).
    #[cfg_attr(feature = "openapi", schema(example = "delivered"))]
    pub status: String,
    pub timestamp_ms: i64,
}

/// The result of a message to many: group, broadcast or channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupSent {
    pub id: String,
    pub delivered: u32,
    pub timestamp_ms: i64,
    /// This `id` was sent before (a retry): answered with the first send's `timestamp_ms`
    /// and pushed to nobody again, so `delivered` is 0.
    pub repeat: bool,
}
