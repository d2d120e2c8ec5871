//! What a client is told: its configuration ([`ClientConfig`], [`ReconnectPolicy`],
//! [`TlsMode`]), who a message is for ([`Recipient`]) and how to send it ([`SendOptions`]).

use super::{ClientError, JITTER};
use crate::{route::RouteClient, tls::ClientTls, Transport};
use std::{fmt, path::PathBuf, time::Duration};

/// Who a private message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    Id(u64),
    Name(String),
}

impl From<u64> for Recipient {
    fn from(id: u64) -> Self {
        Recipient::Id(id)
    }
}

impl From<&str> for Recipient {
    fn from(name: &str) -> Self {
        Recipient::Name(name.to_string())
    }
}

impl From<String> for Recipient {
    fn from(name: String) -> Self {
        Recipient::Name(name)
    }
}

/// When and how often to reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt (default 200 ms); doubles with each failed attempt.
    pub initial_backoff: Duration,
    /// Largest delay between attempts (default 10 s).
    pub max_backoff: Duration,
    /// Attempts per outage before giving up with `Closed`; `None` (default) keeps trying.
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// The delay before reconnect attempt `attempt` (1-based): `initial_backoff · 2^(attempt−1)`
    /// capped at `max_backoff`, times a random factor in [0.8, 1.2), never above `max_backoff`.
    /// The jitter spreads the reconnects of many clients that lost the same server.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_with(attempt, rand::random::<f64>())
    }

    /// [`ReconnectPolicy::backoff`] with the random draw `unit` (in [0, 1)) given.
    pub(crate) fn backoff_with(&self, attempt: u32, unit: f64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        let factor = 1.0 + JITTER * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        // Near `Duration::MAX` the product does not fit: the cap applies then anyway.
        Duration::try_from_secs_f64(base.as_secs_f64() * factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// Whether the connection to the server uses TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS when the route URL is `https://` and the assigned server offers a TLS address
    /// for the transport (`tls_addr` for TCP, `wss_addr` for WebSocket); plain otherwise.
    #[default]
    Auto,
    /// Always TLS: a server without a TLS address for the transport is a connect error.
    On,
    /// Never TLS to servers (the route URL's scheme still decides for the route).
    Off,
}

/// How to reach and log in as one user.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL of a route (or of the load balancer in front of the routes); `https://`
    /// for a route serving HTTPS.
    pub route_url: String,
    pub name: String,
    pub password: String,
    pub transport: Transport,
    pub reconnect: ReconnectPolicy,
    /// TLS to the connection server.
    pub tls: TlsMode,
    /// A CA certificate file (PEM) trusted besides the system's roots, for the route's
    /// HTTPS and the server's TLS (clusters with certificates of their own CA).
    pub ca_file: Option<PathBuf>,
}

impl ClientConfig {
    /// TCP, default reconnect policy, TLS [`TlsMode::Auto`], the system's roots.
    pub fn new(route_url: &str, name: &str, password: &str) -> Self {
        Self {
            route_url: route_url.to_string(),
            name: name.to_string(),
            password: password.to_string(),
            transport: Transport::Tcp,
            reconnect: ReconnectPolicy::default(),
            tls: TlsMode::Auto,
            ca_file: None,
        }
    }

    /// The route client of this config: what it trusts is made once here (the system's
    /// roots plus `ca_file`) when TLS may be used at all.
    pub fn route_client(&self) -> Result<RouteClient, ClientError> {
        let needed = self.tls == TlsMode::On || crate::route::is_https(&self.route_url);
        let tls = match needed {
            true => Some(
                ClientTls::new(self.ca_file.as_deref())
                    .map_err(|e| ClientError::Tls(e.to_string()))?,
            ),
            false => None,
        };
        Ok(RouteClient::with_tls(&self.route_url, tls))
    }
}

// Written by hand so that a `{:?}` of the config never prints the password.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("route_url", &self.route_url)
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .field("transport", &self.transport)
            .field("reconnect", &self.reconnect)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Options of [`Client::send_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Ask for an [`Event::Receipt`] once the receiver's client acknowledged the message.
    pub receipt: bool,
    /// The message id to use (1-64 characters of `[0-9A-Za-z_-]`); `None` (default): the SDK
    /// generates a ULID. An application that keeps its own outbox across restarts sends
    /// again with the same id, and the server stores the message once.
    pub message_id: Option<String>,
}
