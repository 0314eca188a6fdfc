"""Benchmarks for tierserve; run each as `python -m bench.<name>`."""
