//! Layered configuration shared by the binaries: built-in defaults, then an optional TOML file,
//! then environment variables (`{PREFIX}_{FIELD}`), then command-line flags. Each binary owns
//! its config struct and validates it before starting. Also sets up `tracing` logging.

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Default cluster secret: works out of the box on one machine; binaries warn when it is used.
pub const DEV_SECRET: &str = "cim-dev-secret-change-me";

/// Loads `T`: defaults < file < env (`{env_prefix}FIELD`) < `overrides` (flags that were given;
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
    fig.merge(Env::prefixed(env_prefix))
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
