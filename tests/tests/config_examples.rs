//! The example config files in `deploy/config/` load through the binaries' real loader, pass
//! validation, and state exactly the built-in defaults (so the documentation cannot drift).

use std::{collections::BTreeMap, path::PathBuf};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/config")
        .join(name)
}

fn no_flags() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn server_example_is_valid_and_states_the_defaults() {
    let loaded: cim_server::ServerConfig = cim_common::config::load(
        Some(&example("server.toml")),
        "CIM_EXAMPLE_UNSET_",
        &no_flags(),
    )
    .unwrap();
    loaded.validate().unwrap();
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(cim_server::ServerConfig::default()).unwrap()
    );
}

#[test]
fn route_example_is_valid_and_states_the_defaults() {
    let loaded: cim_route::RouteConfig = cim_common::config::load(
        Some(&example("route.toml")),
        "CIM_EXAMPLE_UNSET_",
        &no_flags(),
    )
    .unwrap();
    loaded.validate().unwrap();
    assert_eq!(
        serde_json::to_value(&loaded).unwrap(),
        serde_json::to_value(cim_route::RouteConfig::default()).unwrap()
    );
}

#[test]
fn a_missing_config_file_is_a_clear_error() {
    let err = cim_common::config::load::<cim_server::ServerConfig>(
        Some(&example("nope.toml")),
        "CIM_EXAMPLE_UNSET_",
        &no_flags(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn an_unknown_setting_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "heartbeat_intervall_ms = 5\n").unwrap();
    let err = cim_common::config::load::<cim_server::ServerConfig>(
        Some(&path),
        "CIM_EXAMPLE_UNSET_",
        &no_flags(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("heartbeat_intervall_ms"), "{err}");
}
