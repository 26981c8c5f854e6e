"""Prefect deployments of the FiRe-MPO flows: `python -m deployments.register` (see README.md)."""
