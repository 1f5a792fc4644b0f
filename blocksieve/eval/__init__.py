"""Evaluation: fidelity metrics, real models and texts, tasks, benchmarks and plots."""
