"""Benchmark a policy on a prepared split: generate answers, score them, write predictions.

    from fire_mpo_core.evaluation.vqa import evaluate_policy
    metrics = evaluate_policy(policy, data_root, EvaluateConfig(), out_dir)

Writes `out_dir/data.jsonl` (one prediction per record) and `out_dir/metrics.json` (flat JSON of
named metrics, DESIGN.md section 5).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fire_mpo_core.config import EvaluateConfig
from fire_mpo_core.data.io import load_records, open_image
from fire_mpo_core.evaluation.metrics import closed_correct, exact_match, token_f1, token_recall
from fire_mpo_core.models import generate, load_model, load_processor
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.store import write_jsonl


def load_policy(policy: PolicyRef, dtype: str = "float32"):
    """Model (with its adapter applied, if any) and processor of a policy, in eval mode."""
    model = load_model(policy.base, dtype=dtype, trust_remote_code=policy.trust_remote_code)
    if policy.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, policy.adapter)
    model.eval()
    return model, load_processor(policy.base, trust_remote_code=policy.trust_remote_code)


def score(record_answer_type: str, prediction: str, answer: str) -> dict[str, float]:
    if record_answer_type == "closed":
        return {"correct": float(closed_correct(prediction, answer))}
    return {
        "exact": float(exact_match(prediction, answer)),
        "recall": token_recall(prediction, answer),
        "f1": token_f1(prediction, answer),
    }


def evaluate_policy(
    policy: PolicyRef,
    data_root: Path,
    cfg: EvaluateConfig,
    out_dir: Path,
    dtype: str = "float32",
    on_reject=None,
) -> dict[str, Any]:
    records = load_records(data_root, splits=(cfg.split,), on_reject=on_reject)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    model, processor = load_policy(policy, dtype)
    t0 = time.perf_counter()
    preds = generate(
        model,
        processor,
        [open_image(data_root, r.image) for r in records],
        [r.question for r in records],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    seconds = time.perf_counter() - t0
    rows, by_type = [], defaultdict(lambda: defaultdict(list))
    for r, outs in zip(records, preds, strict=True):
        s = score(r.answer_type, outs[0], r.answer)
        rows.append(
            {
                "id": r.id,
                "answer_type": r.answer_type,
                "question_type": r.question_type,
                "question": r.question,
                "answer": r.answer,
                "prediction": outs[0],
                **s,
            }
        )
        for k, v in s.items():
            by_type[r.answer_type][k].append(v)
            by_type[f"{r.answer_type}/{r.question_type}"][k].append(v)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    metrics: dict[str, Any] = {
        "closed_accuracy": mean(by_type["closed"]["correct"]),
        "open_exact_match": mean(by_type["open"]["exact"]),
        "open_recall": mean(by_type["open"]["recall"]),
        "open_f1": mean(by_type["open"]["f1"]),
        "report_token_f1": mean(by_type["report"]["f1"]),
        "n_closed": len(by_type["closed"]["correct"]),
        "n_open": len(by_type["open"]["exact"]),
        "n_report": len(by_type["report"]["f1"]),
    }
    # Per question type, e.g. closed_presence_accuracy, open_location_exact.
    for name, vals in sorted(by_type.items()):
        kind, _, qtype = name.partition("/")
        if qtype and kind == "closed":
            metrics[f"closed_{qtype}_accuracy"] = mean(vals["correct"])
        elif qtype and kind == "open":
            metrics[f"open_{qtype}_exact"] = mean(vals["exact"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "data.jsonl", rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # Timing stays out of metrics.json: the stage's content (and so every downstream key) must
    # not change when an evaluation is recomputed. The caller puts it in the manifest.
    return {**metrics, "samples_per_second": round(len(records) / max(seconds, 1e-9), 2)}
