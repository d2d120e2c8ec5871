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
//!
//! Flags: each binary has named flags for the settings given most often (listen addresses,
//! backend, secret), and `--set KEY=VALUE` for any setting ([`settings_layer`]), the last
//! layer: `--set max_connections=20000`, `--set backend.redis_url=redis://10.0.0.5:6379`,
//! `--set 'api_keys=["key-1"]'`. The value is read as TOML (a number, a boolean, a list), or
//! else as a string, so `--set login_conflict=replace` needs no quotes.
//!
//! Errors: [`ConfigError`], for every binary and both steps, so a wrong setting reads the
//! same whichever process it is given to: [`ConfigError::Load`] when the layers do not make a
//! configuration (figment's message names the setting and its source), and
//! [`ConfigError::Invalid`] when a setting loaded but cannot be used (each config's
//! `validate()` names the field and why).

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

/// Why a configuration cannot be used. One type for the loaders here and every config's
/// `validate()`; a binary prints it as it is (its `Display` is the whole message).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The layers do not make a configuration: a missing file, bad TOML, an unknown setting,
    /// a value of the wrong type, a malformed `--set`. Boxed: figment's error is large.
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A setting loaded but its value cannot be used.
    #[error("invalid {of} configuration: {field}: {reason}")]
    Invalid {
        /// Whose configuration: `route`, `server`, `standalone` (a standalone process
        /// checks both roles' configurations too, so the message says which).
        of: &'static str,
        /// The setting, as the user writes it (`scan_batch`, `[server] worker_threads`).
        field: String,
        /// What is wrong with its value.
        reason: String,
    },
}

impl ConfigError {
    /// [`ConfigError::Invalid`]: `field` of the `of` configuration, and why.
    pub fn invalid(of: &'static str, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            of,
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The setting an [`Invalid`](ConfigError::Invalid) error names (`None` for a load error,
    /// whose message names it).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Load(_) => None,
            Self::Invalid { field, .. } => Some(field),
        }
    }

    /// Why the setting an [`Invalid`](ConfigError::Invalid) error names is wrong.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Load(_) => None,
            Self::Invalid { reason, .. } => Some(reason),
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        Self::Load(Box::new(e))
    }
}

/// Loads `T`: defaults < file < env (`{env_prefix}FIELD`, `{env_prefix}SECTION__FIELD`) < `overrides` (flags that were given;
/// serialize unset flags as absent with `skip_serializing_if = "Option::is_none"`).
pub fn load<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &impl Serialize,
) -> Result<T, ConfigError> {
    load_with_settings(file, env_prefix, overrides, &[])
}

/// [`load`], then `settings` (`--set KEY=VALUE` flags, see [`settings_layer`]) over everything.
pub fn load_with_settings<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    env_prefix: &str,
    overrides: &impl Serialize,
    settings: &[String],
) -> Result<T, ConfigError> {
    let settings = settings_layer(settings).map_err(figment::Error::from)?;
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(figment::Error::from(format!(
                "config file {} does not exist",
                file.display()
            ))
            .into());
        }
        fig = fig.merge(Toml::file(file));
    }
    fig.merge(Env::prefixed(env_prefix).split(ENV_NESTING))
        .merge(Serialized::defaults(overrides))
        .merge(Toml::string(&settings))
        .extract()
        .map_err(ConfigError::from)
}

/// `KEY=VALUE` settings as one TOML document (`KEY = VALUE` lines). A key is a setting's
/// path, sections joined by dots (`backend.redis_url`); a value that is not TOML is a string.
/// Unknown keys and wrong types are refused when the configuration is read, like a file's.
pub fn settings_layer(settings: &[String]) -> Result<String, String> {
    use figment::Provider;
    let mut doc = String::new();
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| format!("--set {setting:?}: expected KEY=VALUE"))?;
        let key = key.trim();
        let valid_key = !key.is_empty()
            && key.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            });
        if !valid_key {
            return Err(format!(
                "--set {setting:?}: a key is a setting's name, sections joined by dots (e.g. backend.redis_url)"
            ));
        }
        let as_toml = format!("{key} = {}\n", value.trim());
        if Toml::string(&as_toml).data().is_ok() {
            doc.push_str(&as_toml);
        } else {
            let quoted = serde_json::to_string(value).map_err(|e| e.to_string())?;
            doc.push_str(&format!("{key} = {quoted}\n"));
        }
    }
    Ok(doc)
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

    #[test]
    fn any_setting_comes_from_set_flags_last() {
        let prefix = "CIM_COMMON_TEST_SET_";
        std::env::set_var(format!("{prefix}TOP_LEVEL"), "from-env");
        let settings = [
            "top_level=plain words".to_string(),
            "inner.some_url=redis://10.0.0.5:6379".to_string(),
            r#"inner.endpoints=["http://a:2379", "http://b:2379"]"#.to_string(),
        ];
        let loaded: Result<Outer, _> = load_with_settings(None, prefix, &NoFlags {}, &settings);
        std::env::remove_var(format!("{prefix}TOP_LEVEL"));
        assert_eq!(
            loaded.unwrap(),
            Outer {
                top_level: "plain words".into(),
                inner: Inner {
                    some_url: "redis://10.0.0.5:6379".into(),
                    endpoints: vec!["http://a:2379".into(), "http://b:2379".into()],
                },
            }
        );
    }

    #[test]
    fn an_invalid_setting_names_the_configuration_the_field_and_why() {
        let err = ConfigError::invalid("route", "scan_batch", "must be positive");
        assert_eq!(
            err.to_string(),
            "invalid route configuration: scan_batch: must be positive"
        );
        assert_eq!(
            (err.field(), err.reason()),
            (Some("scan_batch"), Some("must be positive"))
        );
        let unknown = std::collections::BTreeMap::from([("no_such_setting", 1)]);
        let err = load::<Outer>(None, "CIM_COMMON_TEST_KIND_", &unknown).unwrap_err();
        assert!(matches!(err, ConfigError::Load(_)), "{err:?}");
        assert_eq!(err.field(), None);
    }

    #[test]
    fn bad_set_flags_are_refused_with_the_flag() {
        let load = |s: &str| {
            load_with_settings::<Outer>(
                None,
                "CIM_COMMON_TEST_SETBAD_",
                &NoFlags {},
                &[s.to_string()],
            )
        };
        for (bad, says) in [
            ("no-equals-sign", "KEY=VALUE"),
            ("Top_Level=x", "a key is"),
            ("inner..some_url=x", "a key is"),
            ("inner.nope=x", "nope"),
            ("inner.endpoints=42", "endpoints"),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
