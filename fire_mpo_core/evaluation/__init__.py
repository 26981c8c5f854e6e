"""Evaluation: answer metrics for medical VQA and reports, and the benchmark runner."""
