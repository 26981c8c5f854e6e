"""Test support (not product code), importable by the tests and by ``bench/``.

- :mod:`testing_support.world`: the tiny data + model world (SynthLesion, tiny models, pairs,
  reference log-probs); the ``tiny_world`` fixture of tests/conftest.py builds it once a spec.
- :mod:`testing_support.pairs`: preference pairs straight from SynthLesion records.
- :mod:`testing_support.fake_openai`: the one fake OpenAI-compatible server (real HTTP on
  127.0.0.1; a vLLM variant, also as a process); the ``fake_openai`` fixture.
- :mod:`testing_support.cycle`: whole cycles without the Prefect API, and the tiny cycle configs.
- :mod:`testing_support.flow_runs`: the small flow config and Prefect task-run states.
- :mod:`testing_support.stage_inputs`: hand-made stage inputs (scans, rollouts, a dataset).
- :mod:`testing_support.foreign_checkpoints`, :mod:`testing_support.tiny_idefics3`: tiny
  checkpoints made with plain transformers.

It imports from the project (``fire_mpo_core``, ``tasks``, ``flows``), never from ``tests/``.
"""

from pathlib import Path

#: The repository root (where ``configs/``, ``Makefile`` and the packages are).
REPO = Path(__file__).resolve().parents[1]
