#!/usr/bin/env bash
# Installs the Debian packages cim needs to build and test, if they are missing:
#   protoc (protobuf-compiler), redis-server (redis-server), etcd (etcd-server), and for the
#   web client's browser test (tests/tests/web.rs): chromium (chromium), node and npm (nodejs,
#   npm); then the test's npm packages (`npm ci` in tests/web when node_modules is missing or
#   was installed from another package-lock.json).
# `--build-only` as the first argument: protoc alone (what building needs; ./start.sh runs the
# standalone mode, which needs neither Redis nor etcd nor a browser). `--tests`: also the
# browser test's chromium, node, npm and npm packages (what ./test.sh needs).
# Extra requirements can be given as COMMAND=PACKAGE arguments, e.g. `curl=curl`.
#
# Used by ./test.sh (and so by .ci/run), by deploy/cluster.sh and by ./start.sh. Idempotent: does nothing when
# every command and the npm packages are already there. Runs `apt-get update` only if the first install fails, uses
# sudo only when not root, and keeps the packages' own system services from starting on install
# (the tests and the local cluster run their own processes; nothing relies on system services).
set -euo pipefail

requirements=(protoc=protobuf-compiler)
web_tests=false
if [[ ${1:-} == --build-only ]]; then
    shift
else
    requirements+=(redis-server=redis-server etcd=etcd-server)
    # The browser, node and npm only for the test suite (./test.sh passes --tests), not for
    # the local cluster or the baseline.
    if [[ ${1:-} == --tests ]]; then
        shift
        web_tests=true
        requirements+=(chromium=chromium node=nodejs npm=npm)
    fi
fi
requirements+=("$@")

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
    if ! command -v "$cmd" >/dev/null 2>&1; then
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
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "install-deps: $cmd still missing after installing ${missing[*]}" >&2
        exit 1
    fi
done
npm_packages
