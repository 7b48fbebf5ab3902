#!/usr/bin/env bash
# Debian packages the tests use: sslscan (TLS versions and ciphers), slowhttptest
# (slowloris), chromium (the status page in a real browser), iproute2 (ip netns, veth,
# tc tbf) and nftables (drop/reject rules) for the fault tests in namespaces
# (tests/faults.rs), tinyproxy, the HTTP proxy tests/proxy.rs starts on ports of its
# own, redis-server and haproxy for the relay cluster's tests, and systemd for
# `systemd-analyze verify` of the units (tests/units.rs; systemd is not started, the
# containers have no init). Idempotent: apt-get runs only when a package is missing.
# Without root (or apt-get) it only reports; the tests that need a tool then fail with
# a message naming it.
set -euo pipefail

packages=(sslscan slowhttptest chromium iproute2 nftables tinyproxy redis-server haproxy systemd)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    echo "setup-debian: apt-get not found; install ${missing[*]} by hand" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then sudo="sudo"; else
        echo "setup-debian: not root; install ${missing[*]} by hand" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The package enables a system-wide tinyproxy on port 8888; the tests start their own.
if [[ " ${missing[*]} " == *" tinyproxy "* ]] && command -v systemctl >/dev/null; then
    $sudo systemctl disable --now tinyproxy >/dev/null 2>&1 || true
fi
