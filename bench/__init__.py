"""Benchmarks of the portal: `make bench` runs `bench.pipeline`; BENCHMARKS.md has the results."""
