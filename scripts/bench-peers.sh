#!/usr/bin/env bash
# Compare hyrelay with other tunnels on loopback, in one run of the load harness
# (benches/load.rs): direct TCP, hyrelay (plain ws://, and TLS with --tls), rathole
# (server+client), bore (server+client), haproxy and socat (one-hop TCP proxies) and a
# websocat chain (websocat client -> websocat server -> endpoint, a WebSocket tunnel).
#
#   scripts/bench-peers.sh [--install-only] [--hyrelay PATH | --hyrelay NAME=PATH ...] [harness args]
#
# Installs the peers idempotently: rathole, bore-cli and websocat with `cargo install --locked`
# from crates.io into $PEERS_ROOT (default target-bench/peers), socat and haproxy with apt-get.
# PEERS (default "rathole bore websocat socat haproxy") picks which of them to install and run.
# A peer that cannot be installed is reported and left out; the rest still run. With
# --install-only it stops after writing the targets file ($CARGO_TARGET_DIR/peers.json), for
# a harness run of one's own (`cargo bench --bench load -- --targets-file ...`). Without
# --hyrelay the harness uses target-bench/release/hyrelay, built from the checked-out tree.
# Every other argument goes to the harness (e.g. --runs 3 --json out.json --tls).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PEERS_ROOT=${PEERS_ROOT:-$ROOT/target-bench/peers}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-bench}
SPEC=$CARGO_TARGET_DIR/peers.json

say() { printf 'bench-peers: %s\n' "$*" >&2; }

# cargo_peer CRATE BIN [install flags...]: installs CRATE unless $PEERS_ROOT/bin/BIN exists.
cargo_peer() {
    local crate=$1 bin=$2
    shift 2
    if [[ -x $PEERS_ROOT/bin/$bin ]]; then
        return 0
    fi
    say "installing $crate from crates.io into $PEERS_ROOT (cargo install --locked $*)"
    # A separate target dir, so peers never share build output with hyrelay.
    if CARGO_TARGET_DIR=$CARGO_TARGET_DIR/peers-build cargo install --locked --root "$PEERS_ROOT" "$@" "$crate" >&2; then
        return 0
    fi
    # rathole 0.5.0's lock file pins time 0.3.2x, which no longer compiles with current
    # rustc (E0282); the same crates.io release builds with its dependencies' newer semver-
    # compatible versions.
    say "cargo install --locked $crate failed; retrying without --locked (newer compatible dependencies from crates.io)"
    if ! CARGO_TARGET_DIR=$CARGO_TARGET_DIR/peers-build cargo install --root "$PEERS_ROOT" "$@" "$crate" >&2; then
        say "cannot install $crate with cargo install; $bin is left out of this run"
        return 1
    fi
}

apt_peer() {
    local pkg=$1
    if command -v "$pkg" >/dev/null 2>&1; then
        return 0
    fi
    say "installing $pkg from Debian (apt-get install $pkg)"
    if [[ ! -e /tmp/.hyrelay-apt-updated ]]; then
        apt-get update -qq >&2 && touch /tmp/.hyrelay-apt-updated
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2; then
        say "cannot install $pkg with apt-get; it is left out of this run"
        return 1
    fi
}

PEERS=${PEERS:-rathole bore websocat socat haproxy}
want() { [[ " $PEERS " == *" $1 "* ]]; }

have_rathole=0 have_bore=0 have_websocat=0 have_socat=0 have_haproxy=0
# Plain TCP transport only: no TLS or noise features, so no OpenSSL is needed.
want rathole && cargo_peer rathole rathole --no-default-features --features server,client && have_rathole=1
want bore && cargo_peer bore-cli bore && have_bore=1
# websocat 1.x; its default features want OpenSSL (ssl), which is optional for ws://.
want websocat && { cargo_peer websocat websocat || cargo_peer websocat websocat --no-default-features; } && have_websocat=1
want socat && apt_peer socat && have_socat=1
want haproxy && apt_peer haproxy && have_haproxy=1

install_only=0
hyrelay_args=()
rest=()
while (($#)); do
    case $1 in
        --install-only) install_only=1 ;;
        --hyrelay) hyrelay_args+=(--hyrelay "$2"); shift ;;
        *) rest+=("$1") ;;
    esac
    shift
done
if ((${#hyrelay_args[@]} == 0)) && ((!install_only)); then
    say "building hyrelay (cargo build --release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    cargo build --release >&2 || { say "cannot build hyrelay"; exit 1; }
    hyrelay_args=(--hyrelay "$CARGO_TARGET_DIR/release/hyrelay")
fi

# The targets, as the harness reads them (benches/load/target.rs): files to write into {dir},
# steps (processes to spawn, in order) and the entry address clients connect to. Placeholders:
# {dir} the target's directory, {endpoint} the harness's endpoint (127.0.0.1:PORT),
# {endpoint_port}, {port0}..{port9} free loopback ports picked by the harness.
B=$PEERS_ROOT/bin
{
    echo '['
    sep=''
    if ((have_rathole)); then
        cat <<EOF
$sep{"name": "rathole", "entry": "127.0.0.1:{port1}",
 "files": {
  "server.toml": "[server]\nbind_addr = \"127.0.0.1:{port0}\"\ndefault_token = \"bench\"\n[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n[server.services.bench]\nbind_addr = \"127.0.0.1:{port1}\"\nnodelay = true\n",
  "client.toml": "[client]\nremote_addr = \"127.0.0.1:{port0}\"\ndefault_token = \"bench\"\n[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n[client.services.bench]\nlocal_addr = \"{endpoint}\"\nnodelay = true\n"},
 "steps": [
  {"spawn": "rathole-server", "argv": ["$B/rathole", "--server", "{dir}/server.toml"], "wait_port": "127.0.0.1:{port0}"},
  {"spawn": "rathole-client", "argv": ["$B/rathole", "--client", "{dir}/client.toml"]}]}
EOF
        sep=','
    fi
    if ((have_bore)); then
        # bore's control port is fixed at 7835; the tunnel port is pinned with --port.
        cat <<EOF
$sep{"name": "bore", "entry": "127.0.0.1:{port1}",
 "steps": [
  {"spawn": "bore-server", "argv": ["$B/bore", "server", "--min-port", "{port1}", "--max-port", "{port1}", "--bind-addr", "127.0.0.1"], "wait_port": "127.0.0.1:7835"},
  {"spawn": "bore-client", "argv": ["$B/bore", "local", "{endpoint_port}", "--local-host", "127.0.0.1", "--to", "127.0.0.1", "--port", "{port1}"]}]}
EOF
        sep=','
    fi
    if ((have_haproxy)); then
        cat <<EOF
$sep{"name": "haproxy", "entry": "127.0.0.1:{port0}",
 "files": {"haproxy.cfg": "global\n  maxconn 9900\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\nfrontend fe\n  bind 127.0.0.1:{port0}\n  default_backend be\nbackend be\n  server ep {endpoint}\n"},
 "steps": [{"spawn": "haproxy", "argv": ["$(command -v haproxy)", "-db", "-f", "{dir}/haproxy.cfg"]}]}
EOF
        sep=','
    fi
    if ((have_socat)); then
        # One process per connection (fork): RSS is summed over them, which counts shared
        # pages once per process, so its idle test stops at 1,000 connections.
        cat <<EOF
$sep{"name": "socat", "entry": "127.0.0.1:{port0}", "idle_max": 1000,
 "steps": [{"spawn": "socat", "argv": ["$(command -v socat)", "TCP-LISTEN:{port0},bind=127.0.0.1,reuseaddr,fork,backlog=4096,nodelay", "TCP:{endpoint},nodelay"]}]}
EOF
        sep=','
    fi
    if ((have_websocat)); then
        # websocat opens only ~20 tunnels/s here, so its idle test also stops at 1,000.
        cat <<EOF
$sep{"name": "websocat", "entry": "127.0.0.1:{port1}", "idle_max": 1000,
 "steps": [
  {"spawn": "websocat-server", "argv": ["$B/websocat", "--binary", "-E", "ws-l:127.0.0.1:{port0}", "tcp:{endpoint}"], "wait_port": "127.0.0.1:{port0}"},
  {"spawn": "websocat-client", "argv": ["$B/websocat", "--binary", "-E", "tcp-l:127.0.0.1:{port1}", "ws://127.0.0.1:{port0}/"]}]}
EOF
    fi
    echo ']'
} >"$SPEC"
say "peer targets: $SPEC"
((install_only)) && { say "peers installed in $PEERS_ROOT"; exit 0; }

exec cargo bench --bench load -- "${hyrelay_args[@]}" --targets-file "$SPEC" "${rest[@]}"
