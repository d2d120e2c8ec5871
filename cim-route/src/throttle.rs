//! Login throttling: what a password guess costs an attacker, and what it cannot cost users.
//!
//! A login's argon2 verification is the route's most expensive work (tens of milliseconds of a
//! core and 19 MiB), so floods are refused *before* it, cheaply:
//! - **Per client address**, every password login takes a token of the address's bucket
//!   (`login_rate_per_addr`/s, `login_burst_per_addr` at once); an empty bucket answers 429
//!   `rate_limited` with `Retry-After`, without hashing. The address is the TCP peer, or the
//!   header `client_ip_header` names (set it only behind a proxy that sets that header: the
//!   rightmost address of `X-Forwarded-For` is the one the proxy saw).
//! - **Per name**, every *failed* login takes a token of the name's bucket
//!   (`login_failures_per_name` per minute, as many at once); once empty, the name is refused
//!   with 429 for right and wrong passwords alike until a token is back: a guesser spread over
//!   many addresses gets that many guesses per minute at one account (this also lets anyone
//!   keep one name's logins refused; the account's owner is still in through resume or a
//!   connected session).
//! - **Hashes in flight** are bounded (`password_queue`, `Passwords::with_queue_limit`): past
//!   it a login answers 429 `busy` at once, so a good login never waits behind more than
//!   that many hashes.
//!
//! Memory is per address or name limited recently (pruned every [`PRUNE_EVERY`]).

use cim_common::limit::KeyedLimit;
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// How often idle buckets and expired blocks are dropped.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Why a login was refused before its password was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// Its address made too many attempts: retry after this long.
    Address(Duration),
    /// Its name had too many failures: retry after this long.
    Name(Duration),
}

/// The login limits of one route instance.
pub struct LoginThrottle {
    per_addr: KeyedLimit<IpAddr>,
    per_name: KeyedLimit<String>,
    /// Names whose failure bucket ran dry, until when they are refused.
    blocked: Mutex<HashMap<String, Instant>>,
}

impl LoginThrottle {
    /// `per_addr`/s with `addr_burst` at once per address; `name_failures` per minute (and
    /// at once) per name. 0 turns a limit off.
    pub fn new(per_addr: u32, addr_burst: u32, name_failures: u32) -> Self {
        let per_name = match name_failures {
            0 => KeyedLimit::new(0, 0),
            n => KeyedLimit::per_period(Duration::from_secs(60) / n, n),
        };
        Self {
            per_addr: KeyedLimit::new(per_addr, addr_burst),
            per_name,
            blocked: Mutex::default(),
        }
    }

    fn blocked(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.blocked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Before the password is checked: takes the address's token, and refuses a blocked
    /// name. `addr` is `None` when unknown (in-process tests): no address limit then.
    pub fn admit(&self, addr: Option<IpAddr>, name: &str) -> Result<(), Throttled> {
        if let Some(until) = self.blocked().get(name).copied() {
            let now = Instant::now();
            if until > now {
                return Err(Throttled::Name(until - now));
            }
        }
        if let Some(addr) = addr {
            self.per_addr.check(&addr).map_err(Throttled::Address)?;
        }
        Ok(())
    }

    /// A login of `name` failed (wrong password or unknown name): takes a token of the name's
    /// bucket; the one that finds it empty blocks the name until the next token.
    pub fn failed(&self, name: &str) {
        let key = name.to_string();
        if let Err(wait) = self.per_name.check(&key) {
            self.blocked().insert(key, Instant::now() + wait);
        }
    }

    /// Drops full buckets and expired blocks.
    pub fn prune(&self) {
        self.per_addr.prune();
        self.per_name.prune();
        let now = Instant::now();
        self.blocked().retain(|_, until| *until > now);
    }
}

/// The client address of a request, as [`client_addr`] finds it (`None` without connect info,
/// e.g. a router called in-process).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl axum::extract::FromRequestParts<crate::state::AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &crate::state::AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let header = state
            .config()
            .client_ip_header
            .as_deref()
            .and_then(|name| parts.headers.get(name))
            .and_then(|v| v.to_str().ok());
        Ok(Self(client_addr(header, peer)))
    }
}

/// The client's address: the rightmost valid address in `header`'s value (when the route is
/// told to trust such a header), else the TCP peer.
pub fn client_addr(header: Option<&str>, peer: Option<IpAddr>) -> Option<IpAddr> {
    header
        .and_then(|value| {
            value
                .rsplit(',')
                .map(str::trim)
                .find(|s| !s.is_empty())
                .and_then(|s| s.parse().ok())
        })
        .or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        s.parse().ok()
    }

    #[test]
    fn an_address_gets_its_burst_then_waits_others_do_not() {
        let t = LoginThrottle::new(1, 3, 0);
        for _ in 0..3 {
            assert_eq!(t.admit(ip("10.0.0.1"), "alice"), Ok(()));
        }
        assert!(matches!(
            t.admit(ip("10.0.0.1"), "alice"),
            Err(Throttled::Address(_))
        ));
        assert_eq!(t.admit(ip("10.0.0.2"), "alice"), Ok(()));
        // Unknown address: no address limit.
        assert_eq!(t.admit(None, "alice"), Ok(()));
    }

    #[test]
    fn a_name_is_blocked_after_its_failures_only() {
        let t = LoginThrottle::new(0, 0, 3);
        for _ in 0..3 {
            assert_eq!(t.admit(ip("10.0.0.1"), "alice"), Ok(()));
            t.failed("alice");
        }
        // The bucket is empty but nothing found it empty yet.
        assert_eq!(t.admit(ip("10.0.0.9"), "alice"), Ok(()));
        t.failed("alice");
        match t.admit(ip("10.0.0.9"), "alice") {
            Err(Throttled::Name(wait)) => {
                assert!(
                    wait > Duration::ZERO && wait <= Duration::from_secs(20),
                    "{wait:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(t.admit(ip("10.0.0.9"), "bob"), Ok(()));
        t.prune();
        assert!(t.admit(ip("10.0.0.9"), "alice").is_err(), "still blocked");
    }

    #[test]
    fn the_header_address_wins_over_the_peer_when_trusted() {
        let peer = ip("127.0.0.1");
        assert_eq!(client_addr(None, peer), peer);
        assert_eq!(
            client_addr(Some("203.0.113.9, 198.51.100.2"), peer),
            ip("198.51.100.2")
        );
        assert_eq!(client_addr(Some("2001:db8::1"), peer), ip("2001:db8::1"));
        assert_eq!(client_addr(Some("garbage"), peer), peer);
        assert_eq!(client_addr(Some(""), peer), peer);
    }
}
