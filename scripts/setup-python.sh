#!/usr/bin/env bash
# Installs the Python rig used by tests/autobahn.rs: kosoku (a Python 3 / Rust port of the
# Autobahn WebSocket test suite, from PyPI) in a virtual environment at
#   ${HYRELAY_PY_VENV:-<repo>/target/py-venv}
#
# Idempotent: when the venv already has the pinned kosoku and it imports, this only checks
# and exits (well under a second).
set -euo pipefail

KOSOKU_VERSION=0.1.0

die() { echo "setup-python.sh: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
venv="${HYRELAY_PY_VENV:-$repo/target/py-venv}"
py="$venv/bin/python"

installed() {
    [ -x "$py" ] && [ -x "$venv/bin/kosoku" ] || return 1
    "$py" - "$KOSOKU_VERSION" >/dev/null 2>&1 <<'EOF'
import sys
from importlib.metadata import version
import kosoku  # the native module must load, not just be listed
assert version("kosoku") == sys.argv[1]
EOF
}

if installed; then
    echo "setup-python.sh: kosoku $KOSOKU_VERSION already installed in $venv"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 is not installed (need Python >= 3.10 on PATH)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "kosoku needs Python >= 3.10 (found $(python3 --version 2>&1))"

echo "setup-python.sh: installing kosoku==$KOSOKU_VERSION into $venv ($(python3 --version 2>&1))"
if [ ! -x "$py" ]; then
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv" \
        || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi
"$py" -m pip install --quiet --disable-pip-version-check --no-input "kosoku==$KOSOKU_VERSION" \
    || die "pip install kosoku==$KOSOKU_VERSION failed (is PyPI reachable?)"

installed || die "kosoku does not import from $venv: $py -c 'import kosoku'"
echo "setup-python.sh: ok — kosoku $KOSOKU_VERSION in $venv"
