"""Benchmarks: run each as `python -m benchmarks.<name> --help` from the repository root."""
