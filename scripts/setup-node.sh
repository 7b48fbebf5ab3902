#!/usr/bin/env bash
# Installs the Node rig used by tests/compat_hyco.rs: Microsoft's hyco-ws@1.0.5 with the
# dependencies it can actually load (ws@1.1.x, moment), into
#   ${HYRELAY_NODE_RIG:-<repo>/target/node-rig}/node_modules
#
# `npm install hyco-ws` does not work: the package lists "http"/"https"/"crypto"/... as
# "latest" dependencies and the registry has no such versions (ETARGET). So (see
# docs hc-protocol.md §11): `npm pack` the tarball, untar it into node_modules/hyco-ws,
# and install ws@1.1.x + moment from a scratch directory into hyco-ws/node_modules.
# Node resolves require('http') etc. to core modules, so the bogus deps do not matter.
#
# Idempotent: a second run only checks the installed versions and exits.
set -euo pipefail

HYCO_WS_VERSION=1.0.5
WS_SPEC='ws@~1.1.5'
MOMENT_SPEC='moment@^2.22.2'

die() { echo "setup-node.sh: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
rig="${HYRELAY_NODE_RIG:-$repo/target/node-rig}"
nm="$rig/node_modules"

command -v node >/dev/null 2>&1 || die "node is not installed (need Node.js >= 14 on PATH)"
command -v npm >/dev/null 2>&1 || die "npm is not installed (need npm on PATH)"

# Prints the "version" field of a package.json, or nothing.
pkg_version() {
    [ -f "$1" ] || return 0
    node -e 'try { process.stdout.write(String(require(process.argv[1]).version || "")) } catch (e) {}' "$1"
}

installed() {
    [ "$(pkg_version "$nm/hyco-ws/package.json")" = "$HYCO_WS_VERSION" ] || return 1
    case "$(pkg_version "$nm/hyco-ws/node_modules/ws/package.json")" in 1.1.*) ;; *) return 1 ;; esac
    [ -n "$(pkg_version "$nm/hyco-ws/node_modules/moment/package.json")" ] || return 1
    # The package must actually load (this is what the tests require).
    (cd "$rig" && node -e 'require("hyco-ws")' >/dev/null 2>&1) || return 1
}

if installed; then
    echo "setup-node.sh: hyco-ws@$HYCO_WS_VERSION already installed in $nm"
    exit 0
fi

echo "setup-node.sh: installing hyco-ws@$HYCO_WS_VERSION into $nm (node $(node --version), npm $(npm --version 2>/dev/null))"
mkdir -p "$rig"
scratch="$(mktemp -d "$rig/.setup.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

# 1. The hyco-ws tarball, unpacked as a package directory.
(cd "$scratch" && npm pack --silent "hyco-ws@$HYCO_WS_VERSION" >pack.out) \
    || die "npm pack hyco-ws@$HYCO_WS_VERSION failed (is registry.npmjs.org reachable?)"
tarball="$scratch/$(tail -n 1 "$scratch/pack.out")"
[ -f "$tarball" ] || die "npm pack did not produce a tarball (got: $(cat "$scratch/pack.out"))"
mkdir -p "$scratch/hyco-ws"
tar -xzf "$tarball" -C "$scratch/hyco-ws" --strip-components=1
[ -f "$scratch/hyco-ws/index.js" ] || die "unexpected hyco-ws tarball layout"

# 2. Its real dependencies, installed from a scratch project (running npm inside hyco-ws
#    would try to resolve the bogus "http": "latest" dependencies and fail with ETARGET).
mkdir -p "$scratch/deps"
printf '{"name":"hyrelay-node-rig-deps","version":"0.0.0","private":true}\n' >"$scratch/deps/package.json"
(cd "$scratch/deps" && npm install --silent --no-audit --no-fund --no-package-lock "$WS_SPEC" "$MOMENT_SPEC") \
    || die "npm install $WS_SPEC $MOMENT_SPEC failed"
rm -rf "$scratch/hyco-ws/node_modules"
mv "$scratch/deps/node_modules" "$scratch/hyco-ws/node_modules"
rm -f "$scratch/hyco-ws/node_modules/.package-lock.json"

# 3. Swap into place.
mkdir -p "$nm"
rm -rf "$nm/hyco-ws"
mv "$scratch/hyco-ws" "$nm/hyco-ws"

installed || die "installed hyco-ws does not load: (cd $rig && node -e 'require(\"hyco-ws\")')"
echo "setup-node.sh: ok — hyco-ws $(pkg_version "$nm/hyco-ws/package.json"), ws $(pkg_version "$nm/hyco-ws/node_modules/ws/package.json"), moment $(pkg_version "$nm/hyco-ws/node_modules/moment/package.json")"
