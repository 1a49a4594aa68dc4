# The two commands a new user needs (see README): `make quickstart` and `make test`.
.PHONY: setup quickstart test test-fast bench dev-cluster-bins dev-cluster-up dev-cluster-down crds

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/muxtune run examples/quickstart/*.yaml --output runs/quickstart

# The control plane binaries, Kueue included, are built before pytest (cold: ~8 min for the
# control plane plus ~7 min for Kueue on 2 cores), so no test spends its time limit on a build.
test: setup
	.venv/bin/muxtune dev-cluster build --kueue
	bash scripts/test.sh

# The edit-test loop (a few minutes on 2 cores): no control plane, nothing marked `slow` (multi-process
# parallel runs, subprocess end-to-end runs, the real-Prometheus stack); `make test` stays the whole suite.
# The chart tests need helm: built with the control plane before pytest, as for `make test` (warm: a stamp check).
test-fast: setup
	.venv/bin/muxtune dev-cluster build
	bash scripts/test.sh --fast

dev-cluster-bins: setup
	.venv/bin/muxtune dev-cluster build

dev-cluster-up: dev-cluster-bins
	.venv/bin/muxtune dev-cluster up

dev-cluster-down: setup
	.venv/bin/muxtune dev-cluster down

crds: setup
	.venv/bin/muxtune crds

bench: setup
	.venv/bin/python -m bench.multitask --quick
