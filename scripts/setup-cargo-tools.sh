#!/usr/bin/env bash
# Cargo tools the suite runs, installed from the Rust registry if missing (idempotent):
# cargo-deny for `cargo deny check licenses bans sources` (deny.toml), cargo-deb for the
# Debian package (scripts/build-deb.sh, tests/package.rs). Each is compiled once (a few
# minutes on 2 cores), only when missing or at another version.
set -euo pipefail

# install TOOL VERSION: `cargo install TOOL` unless `cargo <subcommand> --version` shows VERSION.
install() {
    local tool=$1 version=$2
    if cargo "${tool#cargo-}" --version 2>/dev/null | grep -q "${tool} ${version}\$"; then
        return
    fi
    echo "installing ${tool} ${version} (once; takes a few minutes)" >&2
    # A target directory of its own, so that it neither collides with nor bloats the project's.
    CARGO_TARGET_DIR="${TMPDIR:-/tmp}/hyrelay-cargo-tools" \
        cargo install "${tool}" --locked --version "${version}"
}

install cargo-deny 0.20.2
install cargo-deb 3.8.0
