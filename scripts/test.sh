#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need (idempotently),
# then runs every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Microsoft's hyco-ws and hyco-https clients for the compatibility tests (npm registry).
scripts/setup-node.sh
# kosoku (the Autobahn WebSocket test suite) in a venv, for tests/autobahn.rs (PyPI).
scripts/setup-python.sh
# Debian packages: sslscan and slowhttptest for tests/security.rs, chromium for
# tests/status_page.rs, iproute2 and nftables for the fault tests in network namespaces,
# tinyproxy for tests/proxy.rs, systemd (systemd-analyze) for tests/units.rs.
scripts/setup-debian.sh
# cargo-deny, for the dependency policy in deny.toml, and cargo-deb, for tests/package.rs
# (Rust registry; each compiled once).
scripts/setup-cargo-tools.sh
# promtool (from Debian's prometheus package, only that binary) for `promtool check metrics`
# in tests/admin.rs.
scripts/setup-promtool.sh

# Formatting first: it takes a second and names the file at fault. Then lints (the
# [lints] table in Cargo.toml, both feature sets) and the dependency policy (licenses, bans,
# sources; the advisory database cannot be fetched here).
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features uring -- -D warnings
cargo deny check licenses bans sources
# Intra-doc links must resolve (module docs name the code they describe).
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --quiet
cargo test --locked --all-targets
# The completion engine: its unit tests (src/dataplane/uring) and the end-to-end ones.
cargo test --locked --features uring --lib --test uring --test burst_close --test truncation
