#!/usr/bin/env bash
# Installs the Node rig used by tests/compat_hyco.rs and tests/http_mode_hyco.rs:
# Microsoft's hyco-ws@1.0.5 and hyco-https@1.4.5 with the dependencies they can actually
# load (ws@1.1.x and ws@6.x respectively, moment), into
#   ${HYRELAY_NODE_RIG:-<repo>/target/node-rig}/node_modules
#
# `npm install hyco-ws` does not work: the packages list "http"/"https"/"crypto"/... as
# "latest" dependencies and the registry has no such versions (ETARGET). So (see
# docs hc-protocol.md §11): `npm pack` each tarball, untar it into node_modules/<name>,
# and install its ws + moment from a scratch directory into <name>/node_modules.
# Node resolves require('http') etc. to core modules, so the bogus deps do not matter.
#
# Idempotent: a second run only checks the installed versions and exits.
set -euo pipefail

HYCO_WS_VERSION=1.0.5
WS_SPEC='ws@~1.1.5'
HYCO_HTTPS_VERSION=1.4.5
HTTPS_WS_SPEC='ws@^6.0.0'
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

# installed NAME VERSION WS_MAJOR_GLOB: the package, its ws and moment, and it loads.
installed() {
    [ "$(pkg_version "$nm/$1/package.json")" = "$2" ] || return 1
    # shellcheck disable=SC2254
    case "$(pkg_version "$nm/$1/node_modules/ws/package.json")" in $3) ;; *) return 1 ;; esac
    [ -n "$(pkg_version "$nm/$1/node_modules/moment/package.json")" ] || return 1
    # The package must actually load (this is what the tests require).
    (cd "$rig" && node -e "require('$1')" >/dev/null 2>&1) || return 1
}

# install NAME VERSION WS_SPEC
install() {
    local name="$1" version="$2" ws_spec="$3"
    echo "setup-node.sh: installing $name@$version into $nm (node $(node --version), npm $(npm --version 2>/dev/null))"
    mkdir -p "$rig"
    local scratch
    scratch="$(mktemp -d "$rig/.setup.XXXXXX")"
    # 1. The tarball, unpacked as a package directory.
    (cd "$scratch" && npm pack --silent "$name@$version" >pack.out) \
        || die "npm pack $name@$version failed (is the npm registry reachable?)"
    local tarball
    tarball="$scratch/$(tail -n 1 "$scratch/pack.out")"
    [ -f "$tarball" ] || die "npm pack did not produce a tarball (got: $(cat "$scratch/pack.out"))"
    mkdir -p "$scratch/$name"
    tar -xzf "$tarball" -C "$scratch/$name" --strip-components=1
    [ -f "$scratch/$name/index.js" ] || die "unexpected $name tarball layout"
    # 2. Its real dependencies, installed from a scratch project (running npm inside the
    #    package would try to resolve the bogus "http": "latest" dependencies: ETARGET).
    mkdir -p "$scratch/deps"
    printf '{"name":"hyrelay-node-rig-deps","version":"0.0.0","private":true}\n' >"$scratch/deps/package.json"
    (cd "$scratch/deps" && npm install --silent --no-audit --no-fund --no-package-lock "$ws_spec" "$MOMENT_SPEC") \
        || die "npm install $ws_spec $MOMENT_SPEC failed"
    rm -rf "$scratch/$name/node_modules"
    mv "$scratch/deps/node_modules" "$scratch/$name/node_modules"
    rm -f "$scratch/$name/node_modules/.package-lock.json"
    # 3. Swap into place.
    mkdir -p "$nm"
    rm -rf "${nm:?}/$name"
    mv "$scratch/$name" "$nm/$name"
    rm -rf "$scratch"
}

for pkg in "hyco-ws $HYCO_WS_VERSION $WS_SPEC 1.1.*" "hyco-https $HYCO_HTTPS_VERSION $HTTPS_WS_SPEC 6.*"; do
    # shellcheck disable=SC2086
    set -- $pkg
    if installed "$1" "$2" "$4"; then
        echo "setup-node.sh: $1@$2 already installed in $nm"
        continue
    fi
    install "$1" "$2" "$3"
    installed "$1" "$2" "$4" || die "installed $1 does not load: (cd $rig && node -e 'require(\"$1\")')"
    echo "setup-node.sh: ok — $1 $(pkg_version "$nm/$1/package.json"), ws $(pkg_version "$nm/$1/node_modules/ws/package.json"), moment $(pkg_version "$nm/$1/node_modules/moment/package.json")"
done
