#!/usr/bin/env bash
# Cargo tools the suite runs, installed from the Rust registry if missing (idempotent):
# cargo-deny for `cargo deny check licenses bans sources` (deny.toml).
set -euo pipefail

CARGO_DENY_VERSION=0.20.2

if cargo deny --version 2>/dev/null | grep -q "cargo-deny ${CARGO_DENY_VERSION}"; then
    exit 0
fi
echo "installing cargo-deny ${CARGO_DENY_VERSION} (once; takes a few minutes)" >&2
# A target directory of its own, so that it neither collides with nor bloats the project's.
CARGO_TARGET_DIR="${TMPDIR:-/tmp}/hyrelay-cargo-tools" \
    cargo install cargo-deny --locked --version "${CARGO_DENY_VERSION}"
