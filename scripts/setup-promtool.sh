#!/usr/bin/env bash
# promtool (Prometheus's checker) for tests/admin.rs, which runs `promtool check metrics`
# on every role's /metrics. Taken from Debian's `prometheus` package: the .deb is
# downloaded and only /usr/bin/promtool is installed (as /usr/local/bin/promtool), so no
# Prometheus server is installed or started. Idempotent: does nothing when promtool exists.
set -euo pipefail

command -v promtool >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null; then
    echo "setup-promtool: apt-get not found; install promtool by hand" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-promtool: not root; install promtool (Debian package prometheus) by hand" >&2
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>&1; then
    apt-get update -qq
    apt-get download prometheus
fi
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/promtool /usr/local/bin/promtool
echo "setup-promtool: installed /usr/local/bin/promtool ($(/usr/local/bin/promtool --version 2>&1 | head -1))" >&2
