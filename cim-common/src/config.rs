//! Layered configuration shared by the binaries: built-in defaults, then an optional TOML file,
//! then environment variables (`{PREFIX}_{FIELD}`), then command-line flags. Each binary owns
//! its config struct and validates it before starting. Also sets up `tracing` logging.
//!
//! Environment names: the prefix, then the field path upper-cased with `__` (two underscores)
//! between a section and its field, e.g. `CIM_SERVER_TCP_LISTEN` (top level),
//! `CIM_ROUTE_BACKEND__REDIS_URL` (`[backend] redis_url`),
//! `CIM_STANDALONE_ROUTE__BACKEND__PREFIX` (`[route.backend] prefix`). One underscore cannot
//! separate sections because field names contain underscores. Lists and tables are written as
//! in TOML: `CIM_ROUTE_API_KEYS='["key-1","key-2"]'`.

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Default cluster secret: works out of the box on one machine; binaries warn when it is used.
pub const DEV_SECRET: &str = "cim-dev-secret-change-me";

/// Separator of nested keys in environment names (see the module docs).
pub const ENV_NESTING: &str = "__";

/// Loads `T`: defaults < file < env (`{env_prefix}FIELD`, `{env_prefix}SECTION__FIELD`) < `overrides` (flags that were given;
/// serialize unset flags as absent with `skip_serializing_if = "Option::is_none"`).
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &impl Serialize,
) -> Result<T, Box<figment::Error>> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Box::new(figment::Error::from(format!(
                "config file {} does not exist",
                file.display()
            ))));
        }
        fig = fig.merge(Toml::file(file));
    }
    fig.merge(Env::prefixed(env_prefix).split(ENV_NESTING))
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(Box::new)
}

/// Installs the global `tracing` subscriber: `RUST_LOG` filter (default `info`), plain text to
/// stderr. Safe to call more than once (later calls do nothing).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files stay free of escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Checks that a cluster secret is usable.
pub fn validate_secret(secret: &str) -> Result<(), String> {
    if secret.len() < 16 {
        return Err("cluster_secret must be at least 16 characters".into());
    }
    if secret.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err("cluster_secret must be printable ASCII without spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Outer {
        top_level: String,
        inner: Inner,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Inner {
        some_url: String,
        endpoints: Vec<String>,
    }

    impl Default for Outer {
        fn default() -> Self {
            Self {
                top_level: "default".into(),
                inner: Inner::default(),
            }
        }
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                some_url: "redis://default".into(),
                endpoints: vec!["http://default:2379".into()],
            }
        }
    }

    #[derive(Serialize)]
    struct NoFlags {}

    #[test]
    fn nested_settings_come_from_double_underscore_names() {
        // A prefix of its own: no other test reads these variables.
        let prefix = "CIM_COMMON_TEST_NEST_";
        std::env::set_var(format!("{prefix}TOP_LEVEL"), "from-env");
        std::env::set_var(format!("{prefix}INNER__SOME_URL"), "redis://redis:6379/0");
        std::env::set_var(
            format!("{prefix}INNER__ENDPOINTS"),
            "[\"http://etcd-0:2379\",\"http://etcd-1:2379\"]",
        );
        let loaded: Result<Outer, _> = load(None, prefix, &NoFlags {});
        for var in ["TOP_LEVEL", "INNER__SOME_URL", "INNER__ENDPOINTS"] {
            std::env::remove_var(format!("{prefix}{var}"));
        }
        assert_eq!(
            loaded.unwrap(),
            Outer {
                top_level: "from-env".into(),
                inner: Inner {
                    some_url: "redis://redis:6379/0".into(),
                    endpoints: vec!["http://etcd-0:2379".into(), "http://etcd-1:2379".into()],
                },
            }
        );
    }

    #[test]
    fn a_misspelt_variable_is_refused_with_its_name() {
        let prefix = "CIM_COMMON_TEST_TYPO_";
        // One underscore: an unknown top-level key, as before the nesting convention.
        std::env::set_var(format!("{prefix}INNER_SOME_URL"), "redis://x");
        let err = load::<Outer>(None, prefix, &NoFlags {}).unwrap_err();
        std::env::remove_var(format!("{prefix}INNER_SOME_URL"));
        assert!(err.to_string().contains("inner_some_url"), "{err}");
    }
}
