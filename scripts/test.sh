#!/usr/bin/env bash
# Quick start, command 2: set up and run the whole test suite (slow real-model tests included).
set -euo pipefail
EXTRAS="export,fleet,test" . "$(dirname "$0")/setup-venv.sh"
cd "$ROOT"
# The dashboard's browser tests drive Debian's Chromium (Playwright never downloads a browser here).
if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium for the dashboard's browser tests" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "no chromium and not root: the dashboard's browser tests will be skipped" \
             "(install it with: sudo apt-get install chromium)" >&2
    fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec python -m pytest "$@"
