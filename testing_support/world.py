"""Test helper (not product code): the tiny data + model "world" the unit tests and the bench
run on: a small generated SynthLesion, tiny models trained on its texts, optional preference
pairs with v' (:mod:`testing_support.pairs`) and their reference log-probs.

    world = build_world(
        root,
        data={"image_size": 32, "n_train_images": 8, "n_test_images": 1},
        models={"base": {"hidden_size": 64, "num_heads": 2, "vocab_size": 300}},
        pairs=8,
        reference_max_length=128,
    )
    world["data"], world["records"], world["bases"]["base"], world["pairs_path"], ...

In tests use the session fixture ``tiny_world`` (tests/conftest.py): the same spec is built
once per session and shared by every module that asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: A small clinical corpus for tokenizers of models built without a dataset.
QUADRANTS = ["upper left", "upper right", "lower left", "lower right"]
CORPUS = [
    *(f"Is there a lesion in the {q}?" for q in QUADRANTS),
    *(f"The lesion is in the {q} of the lung." for q in QUADRANTS),
    *(f"A small hyperdense round lesion in the {q}." for q in QUADRANTS),
    "Where is the lesion?",
    "How many lesions are there?",
    "Is the lesion hyperdense or hypodense?",
    "What is the size of the lesion?",
    "Which side is the lesion on?",
    "Yes",
    "No",
    "One",
    "Two",
    "None",
    "left",
    "right",
    "The heart size is normal. No pleural effusion.",
    "There is a large irregular hypodense lesion in the right lower lobe.",
    "The lungs are clear. No acute findings.",
    "Medium oval lesion, upper right, hypodense.",
] * 3

#: What a world's data section means when a key is left out: no validation split, one test scan,
#: two questions per scan and no reports (the fields DataConfig defaults to otherwise).
DATA_DEFAULTS = {
    "n_val_images": 0,
    "n_test_images": 1,
    "questions_per_image": 2,
    "report_fraction": 0.0,
}

#: The preference trainer's world (tests/core/test_trainer.py, test_distributed.py): 32 px
#: SynthLesion with 8 train scans, a tiny LLaVA (hidden 64, 2 heads, vocabulary 300, vision
#: hidden 32, one vision layer), 8 pairs with v' and their reference log-probs.
TRAINER_WORLD = {
    "data": {"image_size": 32, "n_train_images": 8},
    "models": {
        "base": {
            "hidden_size": 64,
            "num_heads": 2,
            "vocab_size": 300,
            "vision_hidden_size": 32,
            "vision_layers": 1,
        }
    },
    "pairs": 8,
    "reference_max_length": 128,
}


def build_world(
    root: Path,
    *,
    data: dict[str, Any],
    models: dict[str, dict[str, Any]] | None = None,
    pairs: int | None = None,
    reference_max_length: int | None = None,
    data_dir: str = "data",
    data_defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate SynthLesion under ``root/data_dir`` (``""``: ``root`` itself) from ``data`` (a
    DataConfig's fields over :data:`DATA_DEFAULTS`, or over ``data_defaults`` when given: ``{}``
    keeps DataConfig's own defaults), build one tiny model per ``models`` entry (name -> ModelConfig
    fields) at ``root/<name>`` on the train split's questions and answers, and with ``pairs``
    write that many preference pairs with v' under ``root/pairs``; with
    ``reference_max_length`` also the first model's reference log-probs of those pairs.

    Returns a dict: ``root``, ``data`` (the data folder), ``records`` (train split), ``texts``,
    ``bases`` (name -> model folder) and, where built, ``base`` / ``policy`` (the first model),
    ``pairs_path``, ``corrupt_root`` (the pairs' folder), ``reference`` and ``reference_info``
    (:func:`train_job` makes a trainer job of them).
    """
    from fire_mpo_core.config import DataConfig, ModelConfig
    from fire_mpo_core.data.io import load_records
    from fire_mpo_core.data.synthlesion import generate_synthlesion
    from fire_mpo_core.models import build_tiny_model
    from fire_mpo_core.policy import PolicyRef

    root = Path(root)
    data_path = root / data_dir if data_dir else root
    defaults = DATA_DEFAULTS if data_defaults is None else data_defaults
    data_cfg = DataConfig(**{**defaults, **data})
    generate_synthlesion(data_cfg, data_path)
    records = load_records(data_path, splits=("train",))
    texts = [t for r in records for t in (r.question, r.answer)]
    world: dict[str, Any] = {"root": root, "data": data_path, "records": records, "texts": texts}
    world["bases"] = {
        name: build_tiny_model(ModelConfig(**fields), texts, data_cfg.image_size, root / name)
        for name, fields in (models or {}).items()
    }
    if world["bases"]:
        world["base"] = next(iter(world["bases"].values()))
        world["policy"] = PolicyRef(base=str(world["base"]))
    if pairs is not None:
        from testing_support.pairs import write_pairs

        world["pairs_path"] = write_pairs(records, data_path, root / "pairs", n=pairs)
        world["corrupt_root"] = world["pairs_path"].parent
    if reference_max_length is not None:
        from fire_mpo_core.training.config import ReferenceConfig
        from fire_mpo_core.training.reference import compute_reference_logprobs

        ref = compute_reference_logprobs(
            world["policy"],
            world["pairs_path"],
            data_path,
            None,
            ReferenceConfig(max_length=reference_max_length),
            root / "reference",
        )
        world["reference"] = Path(ref["path"])
        world["reference_info"] = ref
    return world


def train_job(world: dict, cfg, out_dir: Path, **fields):
    """The :class:`~fire_mpo_core.training.job.TrainJob` of a built world: its policy, pairs,
    data root and reference, with ``cfg`` into ``out_dir`` (``fields`` override any of them)."""
    from fire_mpo_core.training.job import TrainJob

    base = {
        "policy": world["policy"],
        "pairs_path": world["pairs_path"],
        "image_root": world["data"],
        "reference_path": world["reference"],
        "cfg": cfg,
        "out_dir": out_dir,
    }
    return TrainJob(**{**base, **fields})
