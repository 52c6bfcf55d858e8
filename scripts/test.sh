#!/usr/bin/env bash
# Quick start, command 2: set up and run the whole test suite (slow real-model tests included).
set -euo pipefail
EXTRAS="export,test" . "$(dirname "$0")/setup-venv.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec python -m pytest "$@"
