"""Evaluation: benchmarks, generations, metrics and reports."""
