#!/usr/bin/env bash
# Create .venv/ with muxtune and its dependencies. Wheels are cached under ~/.cache/muxtune/wheels
# so a fresh clone on a machine that has run this once installs offline in about a minute.
# One line per stage on stderr; pip's own output goes to .venv/setup.log and is shown only on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${MUXTUNE_WHEELS:-$HOME/.cache/muxtune/wheels}
STAMP=.venv/.muxtune-deps-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
LOG=.venv/setup.log
mkdir -p "$WHEELS"

say() { echo "setup: $*" >&2; }

# Run a command with its output in $LOG; on failure show the log's tail and stop.
logged() {
  if ! "$@" >>"$LOG" 2>&1; then
    say "failed: $*"
    tail -n 40 "$LOG" >&2
    say "full log: $LOG"
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  say "venv (creating .venv)"
  "$PY" -m venv .venv
else
  say "venv (.venv exists)"
fi
: >"$LOG"

pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
if [ ! -f "$STAMP" ]; then
  say "dependencies (installing from the wheel cache $WHEELS)"
  logged pip_install --upgrade "pip>=24" "setuptools>=77" wheel
  reqs=(".[all]" -c constraints.txt)
  if ! pip_install --no-index --find-links "$WHEELS" -e "${reqs[@]}" >>"$LOG" 2>&1; then
    say "dependencies (wheel cache incomplete: downloading; first run only, torch is large)"
    # Resolve the project's own requirement set (extras included) so that every transitive wheel
    # (lm_eval[api]'s tenacity, say) lands in the cache, not just the pinned names.
    logged .venv/bin/python -m pip download -q -d "$WHEELS" "${reqs[@]}" "setuptools>=77" wheel
    logged pip_install --no-index --find-links "$WHEELS" -e "${reqs[@]}"
  fi
  rm -f .venv/.muxtune-deps-*
  touch "$STAMP"
else
  say "dependencies (cached)"
  # Cheap re-link so new packages listed in pyproject are picked up.
  say "muxtune (editable re-link)"
  logged pip_install --no-deps --no-build-isolation -e .
fi
say "ready: .venv/bin/muxtune"
