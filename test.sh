#!/usr/bin/env bash
# The project's test command: formatting, lints, then every test of the workspace.
#
#   ./test.sh            install missing Debian packages, then fmt check, clippy, tests
#   ./test.sh -- ARGS    ARGS go to `cargo test` (e.g. `./test.sh -- -p cim-tests --test backends`)
#
# Integration tests start their own redis-server and etcd processes on free ports (see
# tests/src/lib.rs): no system service is used or needed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

test_args=(--workspace --all-targets)
if [[ ${1:-} == "--" ]]; then
    shift
    test_args=("$@")
fi

./deploy/install-deps.sh --tests

# rustfmt and clippy come with the default rustup profile; add them if this toolchain lacks them.
have_component() {
    cargo "$1" --version >/dev/null 2>&1
}
for component in fmt clippy; do
    if ! have_component "$component" && command -v rustup >/dev/null 2>&1; then
        name=$component
        [[ $component == fmt ]] && name=rustfmt
        rustup component add "$name" >&2 || true
    fi
done

step() {
    echo "==> $*" >&2
}

if have_component fmt; then
    step cargo fmt --all -- --check
    cargo fmt --all -- --check
else
    echo "WARNING: rustfmt unavailable, formatting NOT checked" >&2
fi

if have_component clippy; then
    step cargo clippy --workspace --all-targets -- -D warnings
    cargo clippy --workspace --all-targets -- -D warnings
else
    echo "WARNING: clippy unavailable, lints NOT checked" >&2
fi

step cargo test "${test_args[@]}"
cargo test "${test_args[@]}"
