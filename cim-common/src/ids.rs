//! Identifiers of the cluster's own: server instance ids and session ids, and the rule for
//! instance names. The ids clients see or choose (message ids, channel names) are the wire
//! contract's: `cim_proto::ids`.

use rand::RngExt;

/// A per-process instance id: `{name}-{6 hex digits}`. The random part makes a restarted
/// server a new instance, so state left by its previous life (routes, login slots) is
/// recognisably stale.
pub fn instance_id(name: &str) -> String {
    let n: u32 = rand::rng().random_range(0..0x100_0000);
    format!("{name}-{n:06x}")
}

/// A random session id (128 bits, hex).
pub fn session_id() -> String {
    let n: u128 = rand::rng().random();
    format!("{n:032x}")
}

/// Names of servers and routes: used in Redis values and etcd keys, so restricted to
/// `[A-Za-z0-9_.-]`, 1..=64 characters.
pub fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids_are_valid_names() {
        let id = instance_id("server");
        assert!(id.starts_with("server-"));
        assert!(valid_instance_name(&id));
        assert!(!valid_instance_name("a|b"));
        assert!(!valid_instance_name(""));
    }
}
