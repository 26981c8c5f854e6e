"""Prefect tasks, one module per pipeline stage. Thin: resolve inputs, call the core, publish."""
