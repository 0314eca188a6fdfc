"""Benchmarks reachable from the `tierserve bench` command (heavy imports stay inside each module)."""
