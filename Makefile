# The two commands a new user needs (see README): `make quickstart` and `make test`.
.PHONY: setup quickstart test bench dev-cluster-bins dev-cluster-up dev-cluster-down crds

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/muxtune run examples/quickstart/*.yaml --output runs/quickstart

# The control plane binaries, Kueue included, are built before pytest (cold: ~8 min for the
# control plane plus ~7 min for Kueue on 2 cores), so no test spends its time limit on a build.
test: setup
	.venv/bin/muxtune dev-cluster build --kueue
	bash scripts/test.sh

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
