#!/usr/bin/env bash
# The route's memory under login floods (issue 24): for each size, starts a fresh
# cim-standalone (a route and a connection server in one process, the route's default argon2
# parameters: 19 MiB, 2 iterations) on free loopback ports, sends that many wrong-password
# logins with `cim-bench login-flood` (at most FLOOD_CONCURRENCY in flight), prints the
# process's VmHWM and VmRSS before, right after and FLOOD_SETTLE after, and stops it.
#
#   deploy/login-flood.sh                   1,000 and 10,000 logins (release build first)
#   FLOOD_SIZES="1000" deploy/login-flood.sh
#
# Environment: FLOOD_SIZES ["1000 10000"], FLOOD_CONCURRENCY [1000], FLOOD_SETTLE [5s],
# FLOOD_THROTTLE=1 (keep the login throttle on: the flood is then mostly refused with 429),
# FLOOD_SKIP_BUILD=1 (use the binaries as they are), FLOOD_BIN_DIR [target/release] (where
# cim-standalone and cim-bench are), FLOOD_STANDALONE [FLOOD_BIN_DIR/cim-standalone] (another
# build to measure, e.g. an older commit's), FLOOD_RUN_DIR [run/login-flood]: results there,
# replaced at each run: flood-N.txt (the cim-bench report), standalone-N.log (its logs). Everything started here is stopped on exit, also on failure or ctrl-c.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin_dir=${FLOOD_BIN_DIR:-$repo/target/release}
standalone=${FLOOD_STANDALONE:-$bin_dir/cim-standalone}
run_dir=${FLOOD_RUN_DIR:-$repo/run/login-flood}
sizes=${FLOOD_SIZES:-1000 10000}
concurrency=${FLOOD_CONCURRENCY:-1000}
settle=${FLOOD_SETTLE:-5s}

if [[ ${FLOOD_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$repo" && cargo build --release -p cim-standalone -p cim-bench --bin cim-standalone --bin cim-bench)
fi
mkdir -p "$run_dir"

pid=
cleanup() {
    if [[ -n $pid ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        pid=
    fi
}
trap cleanup EXIT INT TERM

# What is measured is the hashing's memory when every login is hashed (a flood spread over
# many addresses and names): the login throttle and the hashing queue limit, which would refuse
# most of a one-address flood before hashing, are turned off here (FLOOD_THROTTLE=1 keeps them).
if [[ ${FLOOD_THROTTLE:-0} != 1 ]]; then
    export CIM_STANDALONE_ROUTE__LOGIN_RATE_PER_ADDR=0
    export CIM_STANDALONE_ROUTE__LOGIN_FAILURES_PER_NAME=0
    export CIM_STANDALONE_ROUTE__PASSWORD_QUEUE=100000
fi

for n in $sizes; do
    out=$run_dir/standalone-$n.banner
    "$standalone" --http-listen 127.0.0.1:0 --tcp-listen 127.0.0.1:0 --ws-listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 >"$out" 2>"$run_dir/standalone-$n.log" &
    pid=$!
    # The banner names the route's URL once it listens (port 0: chosen at start).
    route=
    for _ in $(seq 100); do
        route=$(sed -n 's/^route: //p' "$out")
        [[ -n $route ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "cim-standalone died, see $run_dir/standalone-$n.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n $route ]] || { echo "cim-standalone did not start within 10 s" >&2; exit 1; }
    "$bin_dir/cim-bench" login-flood --route "$route" --logins "$n" \
        --concurrency "$concurrency" --settle "$settle" | tee "$run_dir/flood-$n.txt"
    cleanup
done
