//! The WebSocket `Origin` allow-list (`ws_allowed_origins`).
//!
//! A browser sends the origin of the page that opens a WebSocket in every handshake, and
//! nothing else stops a page from any site from connecting with the user's browser. Non-browser
//! clients (the SDK, mobile apps) send no `Origin`, and are not what the check is about: a
//! request without one is always let through. An empty list lets every origin through (the
//! default, for local use; the server warns at start when a WebSocket listener then binds
//! beyond loopback, [`unchecked_listeners`]).
//!
//! Entries, compared as browsers serialize an origin (`scheme://host[:port]`; scheme and host
//! case-insensitive, a scheme's default port the same as no port, IDNA hosts in their ASCII
//! form):
//! - an exact origin: `https://chat.example.com`, `http://localhost:8080`,
//!   `capacitor://localhost`;
//! - every subdomain of a domain: `https://*.example.com` matches `https://a.example.com` and
//!   `https://a.b.example.com`, not `https://example.com` (list it too) nor another scheme or
//!   port. Nothing else is a pattern (no `*` elsewhere, no regular expressions).
//!
//! An entry with a path, query, user or anything but an origin is refused at start, as are
//! `null` and `*` alone. A disallowed `Origin` (or one that is not an origin at all, such as
//! `null` from a sandboxed page) is answered 403 with a short reason during the handshake,
//! before any WebSocket frame.

use std::net::SocketAddr;
use url::{Host, Url};

/// One origin as compared: lower-case scheme and host, port with the scheme's default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    scheme: String,
    host: String,
    port: Option<u16>,
    /// The host is a domain name (not an IP address).
    domain: bool,
}

/// Parses `text` as exactly an origin: `scheme://host[:port]`, nothing more.
fn parse(text: &str) -> Result<Parsed, &'static str> {
    let url = Url::parse(text).map_err(|_| "not scheme://host[:port]")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("has a user");
    }
    if !matches!(url.path(), "" | "/") || text.ends_with('/') {
        return Err("has a path");
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("has a query or fragment");
    }
    let (host, domain) = match url.host() {
        Some(Host::Domain(d)) => (d.to_ascii_lowercase(), true),
        Some(ip) => (ip.to_string(), false),
        None => return Err("has no host"),
    };
    if host.is_empty() {
        return Err("has no host");
    }
    Ok(Parsed {
        scheme: url.scheme().to_string(),
        host,
        port: url.port_or_known_default(),
        domain,
    })
}

/// An entry of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    origin: Parsed,
    /// `scheme://*.host`: any subdomain of `host`, not `host` itself.
    subdomains: bool,
}

impl Pattern {
    fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "ws_allowed_origins: {entry:?} {why} (expected an origin such as \
                 https://chat.example.com, or https://*.example.com for its subdomains)"
            )
        };
        let (text, subdomains) = match entry.split_once("://*.") {
            Some((scheme, rest)) => (format!("{scheme}://{rest}"), true),
            None => (entry.to_string(), false),
        };
        let origin = parse(&text).map_err(bad)?;
        if text.contains('*') {
            return Err(bad("has a * other than a leading *. of the host"));
        }
        if subdomains && !origin.domain {
            return Err(bad("has *. before an IP address"));
        }
        Ok(Self { origin, subdomains })
    }

    fn matches(&self, origin: &Parsed) -> bool {
        let want = &self.origin;
        if want.scheme != origin.scheme || want.port != origin.port {
            return false;
        }
        if !self.subdomains {
            return want.host == origin.host;
        }
        origin.domain
            && origin
                .host
                .strip_suffix(want.host.as_str())
                .is_some_and(|label| label.len() > 1 && label.ends_with('.'))
    }
}

/// Why a handshake was refused (the label values of a counter, should one count them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// An origin that is not on the list.
    NotAllowed,
    /// An `Origin` that is not one origin (`null`, garbage, several headers).
    Malformed,
}

impl Refusal {
    /// The reason answered in the 403 body.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "origin not allowed",
            Refusal::Malformed => "malformed Origin header",
        }
    }
}

/// The parsed `ws_allowed_origins`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AllowedOrigins {
    /// `None`: every origin (an empty list).
    patterns: Option<Vec<Pattern>>,
}

impl AllowedOrigins {
    /// Parses the entries; the error names the first bad one.
    pub(crate) fn new(entries: &[String]) -> Result<Self, String> {
        if entries.is_empty() {
            return Ok(Self::default());
        }
        let patterns = entries
            .iter()
            .map(|e| match e.trim() {
                "*" => Err(
                    "ws_allowed_origins: \"*\" is not an entry: an empty list allows \
                            every origin"
                        .to_string(),
                ),
                e => Pattern::parse(e),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns: Some(patterns),
        })
    }

    /// [`AllowedOrigins::new`] for a config that passed validation. Should an entry be bad
    /// anyway, the list allows no origin at all (requests without one still pass): a typo
    /// must never open the list up.
    pub(crate) fn from_config(entries: &[String]) -> Self {
        Self::new(entries).unwrap_or(Self {
            patterns: Some(Vec::new()),
        })
    }

    /// Whether every origin is allowed (the list is empty).
    pub(crate) fn allows_all(&self) -> bool {
        self.patterns.is_none()
    }

    /// Checks the `Origin` headers of a handshake (`None` of them passes).
    pub(crate) fn check<'a>(
        &self,
        mut values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), Refusal> {
        let Some(patterns) = &self.patterns else {
            return Ok(());
        };
        let Some(value) = values.next() else {
            return Ok(());
        };
        if values.next().is_some() {
            return Err(Refusal::Malformed);
        }
        let origin = std::str::from_utf8(value)
            .ok()
            .and_then(|v| parse(v.trim()).ok())
            .ok_or(Refusal::Malformed)?;
        if patterns.iter().any(|p| p.matches(&origin)) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

/// The WebSocket listeners that take every origin from beyond loopback: those the server
/// warns about at start (nothing when `ws_allowed_origins` is set).
pub(crate) fn unchecked_listeners<'a>(
    origins: &AllowedOrigins,
    listeners: &[(&'a str, Option<SocketAddr>)],
) -> Vec<(&'a str, SocketAddr)> {
    if !origins.allows_all() {
        return Vec::new();
    }
    listeners
        .iter()
        .filter_map(|&(name, addr)| Some((name, addr?)))
        .filter(|(_, addr)| !addr.ip().to_canonical().is_loopback())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowedOrigins {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        AllowedOrigins::new(&entries).unwrap()
    }

    fn check(list: &AllowedOrigins, origin: &str) -> Result<(), Refusal> {
        list.check(std::iter::once(origin.as_bytes()))
    }

    #[test]
    fn exact_origins_compare_as_browsers_serialize_them() {
        let l = list(&[
            "https://Chat.Example.com",
            "http://localhost:8080",
            "capacitor://localhost",
        ]);
        for ok in [
            "https://chat.example.com",
            "https://CHAT.example.COM",
            "HTTPS://chat.example.com",
            "https://chat.example.com:443",
            "http://localhost:8080",
            "capacitor://localhost",
            " https://chat.example.com ",
        ] {
            assert_eq!(check(&l, ok), Ok(()), "{ok}");
        }
        for refused in [
            "http://chat.example.com",
            "https://chat.example.com:8443",
            "https://chat.example.com.evil.net",
            "https://evilchat.example.com",
            "https://sub.chat.example.com",
            "http://localhost",
            "http://localhost:8081",
            "https://localhost:8080",
        ] {
            assert_eq!(check(&l, refused), Err(Refusal::NotAllowed), "{refused}");
        }
        for malformed in [
            "null",
            "",
            "chat.example.com",
            "https://chat.example.com/",
            "https://chat.example.com/path",
            "https://user@chat.example.com",
            "https://chat.example.com?x",
            "https://",
        ] {
            assert_eq!(
                check(&l, malformed),
                Err(Refusal::Malformed),
                "{malformed:?}"
            );
        }
        assert_eq!(
            l.check(std::iter::once(&b"https://chat.example.com\xff"[..])),
            Err(Refusal::Malformed)
        );
    }

    #[test]
    fn default_ports_and_ip_hosts() {
        let l = list(&[
            "http://example.com:80",
            "https://[::1]:9443",
            "http://127.0.0.1:8080",
        ]);
        assert_eq!(check(&l, "http://example.com"), Ok(()));
        assert_eq!(check(&l, "https://[0:0::1]:9443"), Ok(()));
        assert_eq!(check(&l, "http://127.0.0.1:8080"), Ok(()));
        assert_eq!(check(&l, "http://127.0.0.2:8080"), Err(Refusal::NotAllowed));
        // IDNA: the Unicode form and the ASCII form browsers send are one origin.
        let l = list(&["https://bücher.example"]);
        assert_eq!(check(&l, "https://xn--bcher-kva.example"), Ok(()));
    }

    #[test]
    fn subdomain_patterns_match_subdomains_only() {
        let l = list(&["https://*.example.com"]);
        for ok in [
            "https://a.example.com",
            "https://a.b.Example.com",
            "https://x.example.com:443",
        ] {
            assert_eq!(check(&l, ok), Ok(()), "{ok}");
        }
        for refused in [
            "https://example.com",
            "https://.example.com",
            "https://badexample.com",
            "https://a.example.com.evil.net",
            "http://a.example.com",
            "https://a.example.com:8443",
            "https://a.example.org",
        ] {
            assert!(check(&l, refused).is_err(), "{refused}");
        }
        let l = list(&["http://*.example.com:8080"]);
        assert_eq!(check(&l, "http://a.example.com:8080"), Ok(()));
        assert_eq!(check(&l, "http://a.example.com"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        for bad in [
            "*",
            "null",
            "example.com",
            "https://example.com/",
            "https://example.com/app",
            "https://u:p@example.com",
            "https://ex*ample.com",
            "https://*example.com",
            "https://a.*.example.com",
            "*://example.com",
            "https://*.127.0.0.1",
            "https://*.[::1]",
            "https://example.com?q",
            "",
        ] {
            let err = AllowedOrigins::new(&[bad.to_string()]).unwrap_err();
            assert!(err.starts_with("ws_allowed_origins"), "{bad:?}: {err}");
            if !bad.is_empty() && bad != "*" {
                assert!(err.contains(bad), "{bad:?}: {err}");
            }
        }
        // A bad entry that slipped past validation allows nothing, never everything.
        let l = AllowedOrigins::from_config(&["https://ok.example".into(), "nope".into()]);
        assert!(!l.allows_all());
        assert_eq!(check(&l, "https://ok.example"), Err(Refusal::NotAllowed));
        assert_eq!(l.check(std::iter::empty()), Ok(()));
    }

    #[test]
    fn no_origin_passes_and_an_empty_list_allows_all() {
        let l = list(&["https://chat.example.com"]);
        assert_eq!(l.check(std::iter::empty()), Ok(()));
        let two = [b"https://chat.example.com".as_slice(); 2];
        assert_eq!(l.check(two.into_iter()), Err(Refusal::Malformed));
        let all = list(&[]);
        assert!(all.allows_all());
        for any in ["https://evil.example", "null", "garbage"] {
            assert_eq!(check(&all, any), Ok(()));
        }
    }

    #[test]
    fn only_open_listeners_without_a_list_are_warned_about() {
        let open = list(&[]);
        let addr = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        let listeners = [
            ("ws_listen", addr("0.0.0.0:9001")),
            ("wss_listen", addr("127.0.0.1:9444")),
        ];
        assert_eq!(
            unchecked_listeners(&open, &listeners),
            vec![("ws_listen", "0.0.0.0:9001".parse().unwrap())]
        );
        let loopback = [
            ("ws_listen", addr("127.0.0.1:9001")),
            ("wss_listen", addr("[::ffff:127.0.0.1]:9444")),
            ("ws_listen", addr("[::1]:9001")),
            ("wss_listen", None),
        ];
        assert!(unchecked_listeners(&open, &loopback).is_empty());
        let checked = list(&["https://chat.example.com"]);
        assert!(unchecked_listeners(&checked, &listeners).is_empty());
        let v6 = [("ws_listen", addr("[::]:9001"))];
        assert_eq!(unchecked_listeners(&open, &v6).len(), 1);
    }
}
