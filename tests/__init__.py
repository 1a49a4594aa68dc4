"""The test suite: a regular package so `tests.helpers` wins over any other `tests` on sys.path."""
