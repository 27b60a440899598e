#!/usr/bin/env bash
# One-command setup for sagellm-backend on a fresh machine (CPython 3.11).
#
#   ./quickstart.sh          set up .venv with every extra needed to develop and test
#   ./quickstart.sh demo     set up, then run the demo on the embedded tiny model
#   ./quickstart.sh test     set up, then run the whole test suite (job 1), then the
#                            no-torch job (job 2) in a second venv
#   ./quickstart.sh notorch  only the no-torch job
#
# Job 2 (a base install, as `pip install isagellm-backend` gives users): $NOTORCH_VENV
# (default .venv-notorch) with `pip install -e .` plus only the test tools; it runs the
# 0.1.1.2 compatibility tests, the provider conformance kit on mock and cpu, the import
# checks, and scripts/check_compat.py (which downloads the published 0.1.1.2 wheel from
# the package index and diffs its public surface against this project); then the same
# tests again under the oldest isagellm-protocol versions the package accepts.
#
# torch is pinned here (a CPU wheel is available offline on the project's machines),
# never in the library's own requirements.
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

NOTORCH_VENV="${NOTORCH_VENV:-.venv-notorch}"
# The no-torch job's tests: compatibility, conformance (mock, cpu), import hygiene.
NOTORCH_TESTS=(tests/compat tests/test_conformance_mock.py tests/test_conformance_cpu.py
  tests/test_import.py)

setup_dev() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  python -m pip install -q --upgrade pip
  python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e ".[hf,embedding,dev]"
}

notorch_job() {
  # Every step is checked explicitly: `set -e` does not apply inside a function called
  # from an `||` list.
  echo "== no-torch job ($NOTORCH_VENV): base install + test tools"
  if [ ! -x "$NOTORCH_VENV/bin/python" ]; then
    "$PY" -m venv "$NOTORCH_VENV" || return 1
  fi
  local npy="$NOTORCH_VENV/bin/python" status=0
  "$npy" -m pip install -q --upgrade pip || return 1
  "$npy" -m pip install -q -e . pytest pytest-asyncio pytest-timeout hypothesis \
    "isagellm-core>=0.1.0,<0.2" || return 1
  if "$npy" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
    echo "no-torch job: torch is importable in $NOTORCH_VENV; remove it" >&2
    return 1
  fi
  "$npy" -m pytest -q -p no:cacheprovider "${NOTORCH_TESTS[@]}" || status=1
  "$npy" scripts/check_compat.py || status=1
  # The oldest protocols of the declared range (isagellm-protocol>=0.1.0,<0.2), each put
  # first on PYTHONPATH in turn: the same tests must pass under them.
  local old tmp
  tmp="$(mktemp -d)"
  for old in 0.1.0 0.1.1.0; do
    echo "== no-torch job: the same tests under isagellm-protocol==$old"
    if "$npy" -m pip install -q --no-deps --target "$tmp/$old" "isagellm-protocol==$old"; then
      PYTHONPATH="$tmp/$old" "$npy" -m pytest -q -p no:cacheprovider "${NOTORCH_TESTS[@]}" \
        || status=1
    else
      status=1
    fi
  done
  rm -rf "$tmp"
  return "$status"
}

case "${1:-setup}" in
  setup) setup_dev; echo "sagellm-backend dev environment ready in $VENV" ;;
  demo) setup_dev; shift; exec sagellm-backend demo "$@" ;;
  test)
    shift
    setup_dev
    echo "== job 1: full test suite ($VENV, with torch)"
    rc=0
    python -m pytest tests -q "$@" || rc=$?
    notorch_job || rc=$((rc == 0 ? 1 : rc))
    exit "$rc"
    ;;
  notorch) notorch_job ;;
  *) echo "usage: $0 [setup|demo|test|notorch] [args...]" >&2; exit 2 ;;
esac
