#!/usr/bin/env bash
# The one release build that ./start.sh and deploy/cluster.sh share: every binary of the
# workspace (cim-standalone, cim-server, cim-route, cim-client, cim-bench, cim-floor) in one
# `cargo build --release --workspace --bins`. One command means one feature resolution, so the
# scripts never rebuild what the other built (building `-p cim-standalone` and then
# `-p cim-server -p cim-route` resolves shared crates' features differently and recompiles
# them); when the binaries are current, cargo does nothing (about a second).
#
#   deploy/build.sh            install protoc when missing, then build
#   CIM_SKIP_BUILD=1 ...       do nothing: the callers then use the binaries in CIM_BIN_DIR
#                              [target/release] as they are (prebuilt, or copied from elsewhere)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ ${CIM_SKIP_BUILD:-} == 1 ]]; then
    exit 0
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "build: cargo not found; install Rust first (https://rustup.rs), or set CIM_SKIP_BUILD=1 and CIM_BIN_DIR to prebuilt binaries" >&2
    exit 1
fi
"$repo/deploy/install-deps.sh" --build-only
echo "build: cargo build --release --workspace --bins" >&2
cd "$repo"
exec cargo build --release --workspace --bins
