"""Benchmarks for muxtune, run from the repo root: `python -m bench.multitask --help`."""
