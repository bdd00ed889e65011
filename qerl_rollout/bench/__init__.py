"""Benchmarks: `python -m qerl_rollout.bench <name> [args]` prints a table and writes JSON."""
