"""Benchmark and workload scripts: run with `python -m kvcli.benchmarks.<name>`; results go to BENCHMARKS.md."""
