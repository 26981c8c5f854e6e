"""Stage `prepare`: the dataset (SynthLesion generated offline, or a real dataset read from
`data.path`: SLAKE, VQA-RAD, IU X-Ray, HF on disk, JSONL) and the base model.

Output folder: `data.jsonl` + `images/` + `masks/` (the dataset root of every later stage),
`policy.json` naming the base model, and `model/` when the tiny LVLM is built here.
"""

from __future__ import annotations

from fire_mpo_core.data.config import DataConfig
from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.prepare_real import prepare_real_dataset
from fire_mpo_core.data.synthlesion import generate_synthlesion
from fire_mpo_core.models import build_tiny_model
from fire_mpo_core.models.config import ModelConfig
from fire_mpo_core.policy import PolicyRef, write_policy
from fire_mpo_core.store import StageWriter
from tasks.common import StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    data = DataConfig.model_validate(call.config["data"])
    model = ModelConfig.model_validate(call.config["model"])
    if data.dataset == "synthlesion":
        counts = generate_synthlesion(data, w.path)
    else:
        counts = prepare_real_dataset(data, w.path, on_reject=w.reject)
    if model.name_or_path is None:
        train = load_records(w.path, splits=("train",), on_reject=w.reject)
        texts = [t for r in train for t in (r.question, r.answer)]
        build_tiny_model(model, texts, data.image_size, w.path / "model")
        write_policy(w.path, PolicyRef(base="model"))
    else:
        write_policy(
            w.path, PolicyRef(base=model.name_or_path, trust_remote_code=model.trust_remote_code)
        )
    return counts


prepare = stage_task(
    "prepare",
    body,
)
