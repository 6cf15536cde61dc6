#!/usr/bin/env bash
# Runs client.py (Python `requests`, OpenAPI checked by openapi-spec-validator; both installed
# from PyPI into a venv under target/ the first time) with CONFIG_JSON.
# Usage: tests/e2e/api/rest/run.sh CONFIG_JSON
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
venv="${TERN_PY_REST_VENV:-$root/target/py-venv-rest}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import requests, openapi_spec_validator' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check requests==2.32.3 openapi-spec-validator==0.7.1
fi
exec "$venv/bin/python" "$here/client.py" "$1"
