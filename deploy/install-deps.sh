#!/usr/bin/env bash
# Installs the Debian packages cim needs to build and test, if they are missing:
#   protoc (protobuf-compiler) and the well-known .proto files it imports
#   (google/protobuf/descriptor.proto & co., libprotobuf-dev: Debian's protobuf-compiler does
#   not ship them, and etcd-client's build imports them), redis-server (redis-server), etcd
#   (etcd-server), and for the test suite: the web client's browser test (tests/tests/web.rs):
#   chromium (chromium), node and npm (nodejs, npm), then the test's npm packages (`npm ci` in
#   tests/web when node_modules is missing or was installed from another package-lock.json);
#   nginx (nginx: `nginx -t` checks the deploy/ load-balancer configs); curl (curl: README's
#   walkthrough runs as written in cim-standalone's tests).
# `--build-only` as the first argument: protoc and its includes alone (what building needs;
# ./start.sh runs the standalone mode, which needs neither Redis nor etcd nor a browser).
# `--tests`: everything the test suite needs (what ./test.sh passes).
# Extra requirements can be given as COMMAND=PACKAGE arguments, e.g. `jq=jq`.
# `--list [--build-only|--tests]`: print the packages that mode installs, one per line as
# `PACKAGE COMMAND`, and exit (.ci/check-system-deps compares them with the packages the files in use come from).
#
# Used by ./test.sh (and so by .ci/run), by deploy/cluster.sh and by ./start.sh. Idempotent: does nothing when
# every requirement and the npm packages are already there. Runs `apt-get update` only if the first install fails, uses
# sudo only when not root, and keeps the packages' own system services from starting on install
# (the tests and the local cluster run their own processes; nothing relies on system services).
set -euo pipefail

# COMMAND=PACKAGE: PACKAGE provides COMMAND. `proto-includes` is not a command: it holds when
# protoc can import google/protobuf/descriptor.proto (see have below).
requirements=(protoc=protobuf-compiler proto-includes=libprotobuf-dev)
web_tests=false
list_only=false
if [[ ${1:-} == --list ]]; then
    shift
    list_only=true
fi
if [[ ${1:-} == --build-only ]]; then
    shift
else
    # redis-cli: Redis Cluster creation (the testkit's RedisCluster, cluster.sh with
    # CIM_REDIS_MASTERS); Debian's redis-server depends on redis-tools, listed for itself.
    requirements+=(redis-server=redis-server redis-cli=redis-tools etcd=etcd-server)
    # The browser, node, npm and nginx only for the test suite (./test.sh passes --tests), not
    # for the local cluster or the baseline.
    if [[ ${1:-} == --tests ]]; then
        shift
        web_tests=true
        requirements+=(chromium=chromium node=nodejs npm=npm nginx=nginx curl=curl)
    fi
fi
requirements+=("$@")

if [[ $list_only == true ]]; then
    for req in "${requirements[@]}"; do
        echo "${req#*=} ${req%%=*}"
    done
    exit 0
fi

# nginx and other daemons live in /usr/sbin, which a non-root PATH may lack.
PATH=$PATH:/usr/sbin:/sbin

# Whether a requirement holds. For proto-includes: protoc compiles a file that imports
# descriptor.proto (what etcd-client's build does), from protoc's own include path.
have() {
    if [[ $1 == proto-includes ]]; then
        command -v protoc >/dev/null 2>&1 || return 1
        local dir ok=0
        dir=$(mktemp -d)
        printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$dir/probe.proto"
        protoc --proto_path="$dir" --descriptor_set_out=/dev/null "$dir/probe.proto" \
            >/dev/null 2>&1 || ok=1
        rm -rf "$dir"
        return $ok
    fi
    command -v "$1" >/dev/null 2>&1
}

# The browser test's npm packages (playwright-core, pinned by package-lock.json). The stamp
# holds the hash of the lock file node_modules was installed from; a changed lock reinstalls.
web_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/web
npm_packages() {
    [[ $web_tests == true && -f $web_dir/package-lock.json ]] || return 0
    local stamp=$web_dir/node_modules/.cim-lock-sha256 want
    want=$(sha256sum "$web_dir/package-lock.json" | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    echo "install-deps: npm ci in tests/web" >&2
    (cd "$web_dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
    echo "$want" >"$stamp"
}

missing=()
for req in "${requirements[@]}"; do
    cmd=${req%%=*}
    pkg=${req#*=}
    if ! have "$cmd"; then
        missing+=("$pkg")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    npm_packages
    exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: apt-get not found; install these packages by hand: ${missing[*]}" >&2
    exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-deps: not root and no sudo; install these packages by hand: ${missing[*]}" >&2
        exit 1
    fi
    sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive

# Keep redis-server / etcd-server from starting their system services on install (they would
# take ports 6379 / 2379), unless the machine already has its own policy.
policy=/usr/sbin/policy-rc.d
added_policy=false
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    added_policy=true
fi
remove_policy() {
    if [[ $added_policy == true ]]; then
        "${sudo[@]}" rm -f "$policy"
    fi
}
trap remove_policy EXIT

install() {
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
}
if ! install; then
    echo "install-deps: install failed, running apt-get update and trying again" >&2
    "${sudo[@]}" apt-get update -q
    install
fi

for req in "${requirements[@]}"; do
    cmd=${req%%=*}
    if ! have "$cmd"; then
        echo "install-deps: $cmd still missing after installing ${missing[*]}" >&2
        exit 1
    fi
done
npm_packages
