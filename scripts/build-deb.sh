#!/usr/bin/env bash
# Builds the Debian package: target/debian/hyrelay_<version>-1_<arch>.deb (or into --out).
#   scripts/build-deb.sh                   release build, then the package
#   scripts/build-deb.sh --profile dev --no-build --fast --out DIR   (tests/package.rs:
#                                          the debug binary `cargo test` already built)
# Generates the shell completions and man pages from the binary into the profile's target
# directory (cargo-deb's assets name them there), then runs `cargo deb`. Needs cargo-deb
# (scripts/setup-cargo-tools.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release build=1 out=() fast=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --out) out=(--output "$2"); shift 2 ;;
        --fast) fast=(--fast); shift ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done
dir=$profile
[ "$profile" = dev ] && dir=debug
target=${CARGO_TARGET_DIR:-target}/$dir

if [ $build = 1 ]; then
    cargo build --locked --profile "$profile" --bin hyrelay
fi
bin=$target/hyrelay
mkdir -p "$target/completions" "$target/man"
"$bin" completions bash > "$target/completions/hyrelay.bash"
"$bin" completions zsh > "$target/completions/_hyrelay"
"$bin" completions fish > "$target/completions/hyrelay.fish"
rm -f "$target"/man/*.1 "$target"/man/*.1.gz
"$bin" manpages "$target/man"
gzip -9n "$target"/man/*.1
flags=(--no-build --locked)
[ "$profile" = release ] || flags+=(--profile "$profile")
cargo deb "${flags[@]}" "${out[@]}" "${fast[@]}"
