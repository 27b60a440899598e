#!/usr/bin/env bash
# One-command setup for sagellm-backend on a fresh machine (CPython 3.11).
#
#   ./quickstart.sh          set up .venv with every extra needed to develop and test
#   ./quickstart.sh demo     set up, then run the demo on the embedded tiny model
#   ./quickstart.sh test     set up, then run the whole test suite
#
# torch is pinned here (a CPU wheel is available offline on the project's machines),
# never in the library's own requirements.
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[hf,embedding,dev]"

case "${1:-setup}" in
  setup) echo "sagellm-backend dev environment ready in $VENV" ;;
  demo) shift; exec sagellm-backend demo "$@" ;;
  test) shift; exec python -m pytest tests -q "$@" ;;
  *) echo "usage: $0 [setup|demo|test] [args...]" >&2; exit 2 ;;
esac
