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
# tests/status_page.rs, iproute2 and nftables for the fault tests in network namespaces.
scripts/setup-debian.sh

# Formatting first: it takes a second and names the file at fault.
cargo fmt --check
cargo test --locked --all-targets
cargo test --locked --features uring --test uring
