#!/usr/bin/env bash
# client.py with Python `requests` and openapi-spec-validator from PyPI.
# Usage: tests/e2e/api/rest/run.sh CONFIG_JSON
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../venv.sh" py-venv-rest "requests==2.32.3 openapi-spec-validator==0.7.1" "$here/client.py" "$1"
