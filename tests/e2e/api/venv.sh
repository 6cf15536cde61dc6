#!/usr/bin/env bash
# Runs a Python script of the tests in a venv under target/ made the first time from PyPI.
# Usage: tests/e2e/api/venv.sh VENV_NAME "PACKAGE==VERSION ..." SCRIPT [ARGS...]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
venv="$root/target/$1"
packages="$2"
shift 2
modules="$(for p in $packages; do n="${p%%==*}"; n="${n//-/_}"; echo -n "import ${n}; "; done)"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "$modules" 2>/dev/null; then
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --disable-pip-version-check $packages
fi
exec "$venv/bin/python" "$@"
