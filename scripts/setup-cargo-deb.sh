#!/usr/bin/env bash
# cargo-deb (builds the Debian package; tests/package.rs) from crates.io, pinned. Idempotent:
# compiles it (a few minutes on 2 cores) only when `cargo deb` is missing or another version.
set -euo pipefail
version=3.8.0
if cargo deb --version 2>/dev/null | grep -q " $version\$"; then
    exit 0
fi
cargo install --locked --version "$version" cargo-deb
