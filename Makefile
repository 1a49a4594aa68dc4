# The two commands a new user needs (see README): `make quickstart` and `make test`.
.PHONY: setup quickstart test bench dev-cluster-up dev-cluster-down

setup:
	bash scripts/setup.sh

quickstart: setup
	.venv/bin/muxtune run examples/quickstart/*.yaml --output runs/quickstart

test: setup
	bash scripts/test.sh

bench: setup
	.venv/bin/python -m bench.multitask --quick
