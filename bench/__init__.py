"""Benchmarks: `python bench/latency.py` (or `vce bench`) times every backend on the same inputs."""
