"""Stage `sft`: supervised warm start of the base policy on the train split.

Input `prepare`. Output: the fine-tuned model (`save_pretrained` files), `train_log.jsonl`,
`policy.json`. With `sft.enabled: false` (real, already instruction-tuned checkpoints) the output
only points at the base model.
"""

from __future__ import annotations

from fire_mpo_core.data.io import load_records
from fire_mpo_core.policy import PolicyRef, read_policy, write_policy
from fire_mpo_core.store import StageWriter
from fire_mpo_core.training.config import SFTConfig
from fire_mpo_core.training.sft import run_sft
from tasks.common import StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = SFTConfig.model_validate(call.config["sft"])
    data_root = call.inputs["prepare"]
    base = read_policy(data_root)
    if not cfg.enabled:
        write_policy(w.path, base)
        return {"steps": 0}
    records = load_records(data_root, splits=("train",), on_reject=w.reject)
    metrics = run_sft(
        base.base,
        records,
        data_root,
        cfg,
        w.path / "model",
        call.config["dtype"],
        w.reject,
        call.config.get("warm_vision", False),
    )
    write_policy(w.path, PolicyRef(base="model"))
    return metrics


sft = stage_task(
    "sft",
    body,
    tags=["compute"],
)
