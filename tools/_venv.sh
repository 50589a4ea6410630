# Shared by tools/run and tools/test (sourced, not run): make the project's
# virtualenv exist and hold an up-to-date install of qmpgraph.
#
# ensure_venv EXTRAS   e.g. ensure_venv ""  or  ensure_venv "[test]"
# Sets VENV and PY. Reinstalls only when pyproject.toml or the extras changed,
# so running the tools again is quick and changes nothing.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${QMPGRAPH_VENV:-$ROOT/.venv}
PY=$VENV/bin/python

say() { printf '%s\n' "$*" >&2; }

ensure_venv() {
    local extras=$1
    local python=${PYTHON:-python3}
    if [ ! -x "$PY" ]; then
        if ! command -v "$python" >/dev/null 2>&1; then
            say "error: $python not found; install Python 3.11 or newer (apt-get install python3)"
            exit 1
        fi
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            say "error: $("$python" --version) is too old; qmpgraph needs Python 3.11 or newer"
            exit 1
        fi
        say "creating virtualenv $VENV"
        if ! "$python" -m venv "$VENV" 2>/dev/null; then
            # Debian ships venv's pip bootstrap separately.
            rm -rf "$VENV"
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
                "$python" -m venv "$VENV"
            else
                say "error: '$python -m venv' failed; install it: sudo apt-get install python3-venv"
                exit 1
            fi
        fi
    fi
    local stamp=$VENV/.qmpgraph-install
    local want
    want="$extras $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c 'import qmpgraph' 2>/dev/null; then
        say "installing qmpgraph$extras into $VENV"
        "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT$extras"
        printf '%s' "$want" >"$stamp"
    fi
}
