"""Helpers shared by several test directories (plain functions and context managers, no fixtures).

tests/ is on sys.path for every test (pytest puts the directory of tests/conftest.py there), so any
test imports these as `from helpers.procs import ...`."""
