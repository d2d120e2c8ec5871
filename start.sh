#!/usr/bin/env bash
# Try cim in one command: one process runs a route and a connection server with all state in
# memory (the standalone mode, crate cim-standalone). No etcd, no Redis.
#
#   ./start.sh                 build (release) and run on 127.0.0.1: route HTTP :8080,
#                              client TCP :9000, client WebSocket :9001 (path /ws)
#   ./start.sh --help          every flag; e.g. --http-listen 0.0.0.0:8080 --tcp-listen
#                              0.0.0.0:9000 --ws-listen 0.0.0.0:9001 --advertise-host <LAN IP>
#                              to serve other machines, or --config standalone.toml
#
# Arguments go to cim-standalone. It prints the route URL and the client command, and stops
# gracefully on ctrl-c. A real cluster (etcd, Redis, several servers) is deploy/cluster.sh.
# Installs the Debian package the build needs (protobuf-compiler) when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v cargo >/dev/null 2>&1; then
    echo "start.sh: cargo not found; install Rust first: https://rustup.rs" >&2
    exit 1
fi
./deploy/install-deps.sh --build-only
exec cargo run --release -p cim-standalone -- "$@"
