# The two commands a new user needs (see README): `make quickstart` and `make test`.
.PHONY: setup quickstart test bench dev-cluster-bins dev-cluster-up dev-cluster-down crds

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/muxtune run examples/quickstart/*.yaml --output runs/quickstart

# The control plane binaries are built before pytest (a cold build takes ~8 min on 2 cores).
test: setup dev-cluster-bins
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
