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
# The build is deploy/build.sh (the same one as deploy/cluster.sh's: neither undoes the
# other's; nothing is rebuilt when the binaries are current), which installs the Debian
# packages the build needs (protobuf-compiler, libprotobuf-dev) when missing.
#   CIM_SKIP_BUILD=1           no build: run $CIM_BIN_DIR/cim-standalone as it is
#   CIM_BIN_DIR [target/release]  where the binaries are
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bin_dir=${CIM_BIN_DIR:-$PWD/target/release}

./deploy/build.sh
if [[ ! -x $bin_dir/cim-standalone ]]; then
    echo "start.sh: $bin_dir/cim-standalone is missing (build failed, or CIM_BIN_DIR is wrong)" >&2
    exit 1
fi
exec "$bin_dir/cim-standalone" "$@"
