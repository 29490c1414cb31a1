"""Benchmark harness for early-exit neural networks (see README.md and DESIGN)."""
