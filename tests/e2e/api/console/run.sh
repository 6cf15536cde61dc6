#!/usr/bin/env bash
# browser.py with Playwright from PyPI, against Debian's Chromium (/usr/bin/chromium, or
# TERN_CHROMIUM): no browser is downloaded.
# Usage: tests/e2e/api/console/run.sh CONFIG_JSON
here="$(cd "$(dirname "$0")" && pwd)"
exec "$here/../venv.sh" py-venv-browser "playwright==1.65.3 requests==2.32.3" "$here/browser.py" "$1"
