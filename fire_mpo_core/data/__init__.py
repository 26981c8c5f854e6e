"""Datasets and record contracts (SynthLesion, real-format loaders)."""
