#!/usr/bin/env bash
# Create .venv/ with muxtune and its dependencies. Wheels are cached under ~/.cache/muxtune/wheels
# so a fresh clone on a machine that has run this once installs offline in about a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${MUXTUNE_WHEELS:-$HOME/.cache/muxtune/wheels}
STAMP=.venv/.muxtune-deps-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
mkdir -p "$WHEELS"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$STAMP" ]; then
  echo "setup: installing dependencies into .venv (wheel cache: $WHEELS)" >&2
  .venv/bin/python -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
  reqs=(".[all]" -c constraints.txt)
  if ! .venv/bin/python -m pip install -q --no-index --find-links "$WHEELS" -e "${reqs[@]}" 2>/dev/null; then
    echo "setup: wheel cache incomplete, downloading (first run only; torch is large)" >&2
    .venv/bin/python -m pip download -q -d "$WHEELS" -r constraints.txt "setuptools>=68" wheel
    .venv/bin/python -m pip install -q --no-index --find-links "$WHEELS" -e "${reqs[@]}"
  fi
  rm -f .venv/.muxtune-deps-*
  touch "$STAMP"
else
  # Cheap re-link so new packages listed in pyproject are picked up.
  .venv/bin/python -m pip install -q --no-deps -e . >/dev/null
fi
