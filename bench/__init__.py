"""Benchmarks (not tests): ``python -m bench`` prints one table and writes bench/RESULTS.md."""
