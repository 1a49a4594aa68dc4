#!/usr/bin/env bash
# The whole test suite, as CI runs it. Assumes scripts/setup.sh has run (make test does that).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
exit $rc
