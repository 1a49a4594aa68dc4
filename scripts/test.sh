#!/usr/bin/env bash
# The whole test suite, as CI runs it. `make test` runs scripts/setup.sh first.
# Everything the tests need beyond .venv is installed here, idempotently, from the machine's
# registries: Prometheus from Debian (observability tests); the local control plane is built
# from the Go module proxy by the cluster fixture itself, cached under ~/.cache/muxtune.
# --fast (make test-fast): only tests marked neither `cluster` nor `slow` (pyproject's markers).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-prometheus.sh || { echo "test: cannot install prometheus" >&2; exit 1; }
if [ "${1:-}" = "--fast" ]; then
    shift
    set -- -m "not cluster and not slow" "$@"
fi
.venv/bin/python -m pytest "$@"
rc=$?
# pytest's exit 5 (nothing collected) is a failure of the suite, never a pass.
exit $rc
