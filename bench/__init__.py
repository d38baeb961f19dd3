"""Benchmarks: `python -m bench` (bench/latency.py) times every backend on the same inputs; `python -m
bench.gpu_check` is the GPU check (scripts/gpu_check.sh)."""
