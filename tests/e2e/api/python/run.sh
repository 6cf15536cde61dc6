#!/usr/bin/env bash
# Generates a Python client from proto/ with grpcio-tools (installed from PyPI into a venv
# under target/ the first time) and runs client.py against ENDPOINT for VM_ID.
# Usage: tests/e2e/api/python/run.sh ENDPOINT VM_ID
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../../.." && pwd)"
venv="${TERN_PY_VENV:-$root/target/py-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import grpc, grpc_tools' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q grpcio grpcio-tools
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$out" --grpc_python_out="$out" \
    "$root"/proto/tern/v1/*.proto
PYTHONPATH="$out" "$venv/bin/python" "$here/client.py" "$1" "$2"
