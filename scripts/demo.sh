#!/usr/bin/env bash
# Quick start, command 1: set up and run Edge's main job on the embedded defaults.
set -euo pipefail
EXTRAS="export,fleet" . "$(dirname "$0")/setup-venv.sh"
exec edge demo "$@"
