"""Benchmark a policy on a prepared split: generate answers, score them, write predictions.

    from fire_mpo_core.evaluation.vqa import evaluate_policy
    metrics = evaluate_policy(policy, data_root, EvaluateConfig(), out_dir)

Writes `out_dir/data.jsonl` (one prediction per record), `out_dir/metrics.json` (flat JSON of
named metrics, docs/design.md section 5) and, with grounding on, `out_dir/grounding.jsonl` (one row
per grounding sample). Metrics (one float each, None where the split has nothing to score):

* answers: `closed_accuracy`, `closed_lesion_accuracy` (closed questions but modality),
  `closed_modality_accuracy` (each with `_n`, `_ci_low`, `_ci_high`: 95% Wilson),
  `open_exact_match`, `open_recall`, `open_f1`, per question type (`closed_<type>_accuracy`,
  `open_<type>_exact`), counts `n_closed`, `n_open`, `n_report`;
* reports (`evaluation.report_metrics`): `report_bleu`, `report_rouge_l`, `report_token_f1`,
  `clinical_precision`, `clinical_recall`, `clinical_f1`;
* grounding (`evaluation.grounding`, `EvaluateConfig.grounding`): the headline
  `grounded_accuracy` (right on v and on v' with the lesion removed), `keep_accuracy`,
  `flip_given_right`, `presence_accuracy_truth_yes` / `_truth_no`, `visual_logp_drop` (each
  rate with n and a 95% interval), `blind_accuracy`, `blind_gap`,
  `lesion_attention_ratio` and `lesion_attention_ratio_l<layer>`, with their sample counts;
* optional endpoint scores (`evaluation.llm_judge`, off by default): `open_llm_accuracy`
  (`EvaluateConfig.llm_judge`), `report_green` (`EvaluateConfig.green`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fire_mpo_core.data.io import load_records, open_image
from fire_mpo_core.evaluation.config import EvaluateConfig
from fire_mpo_core.evaluation.grounding import measure_grounding
from fire_mpo_core.evaluation.llm_judge import (
    OpenItem,
    ReportItem,
    green_scores,
    judge_open_answers,
)
from fire_mpo_core.evaluation.metrics import closed_correct, exact_match, token_f1, token_recall
from fire_mpo_core.evaluation.report_metrics import report_metrics
from fire_mpo_core.evaluation.stats import rate_with_ci
from fire_mpo_core.models import generate, load_model, load_processor
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.store import write_jsonl

#: Report metrics always in metrics.json (None without report records).
REPORT_KEYS = (
    "report_bleu",
    "report_rouge_l",
    "report_token_f1",
    "clinical_precision",
    "clinical_recall",
    "clinical_f1",
)


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


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def evaluate_policy(
    policy: PolicyRef,
    data_root: Path,
    cfg: EvaluateConfig,
    out_dir: Path,
    dtype: str = "float32",
    on_reject=None,
) -> dict[str, Any]:
    """Generate an answer per record of ``cfg.split``, score it, and write ``data.jsonl``
    (per record), ``metrics.json`` and, with grounding on, ``grounding.jsonl`` into
    ``out_dir``. Returns the metrics plus ``samples_per_second`` (kept out of metrics.json)."""
    model, processor = load_policy(policy, dtype)
    return score_split(model, processor, data_root, cfg, out_dir, out_dir / METRICS, on_reject)


METRICS = "metrics.json"
#: The selection pass's metrics beside metrics.json; its per-record rows go to ``val/``.
SELECTION_METRICS_FILE = "val_metrics.json"
SELECTION_ROWS = "val"


def evaluate_with_selection(
    policy: PolicyRef,
    data_root: Path,
    cfg: EvaluateConfig,
    out_dir: Path,
    dtype: str = "float32",
    on_reject=None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`evaluate_policy` on ``cfg.split`` plus, when ``cfg.selection_split`` is set, the
    selection pass on it (the model loaded once): ``val_metrics.json`` beside metrics.json and
    its rows under ``val/``. Returns (metrics, selection metrics or None)."""
    model, processor = load_policy(policy, dtype)
    metrics = score_split(model, processor, data_root, cfg, out_dir, out_dir / METRICS, on_reject)
    if cfg.selection_split is None:
        return metrics, None
    sel = cfg.model_copy(
        update={"split": cfg.selection_split, "max_samples": cfg.selection_max_samples}
    )
    if (sel.split, sel.max_samples) == (cfg.split, cfg.max_samples):  # the same pass: reuse it
        (out_dir / SELECTION_METRICS_FILE).write_text((out_dir / METRICS).read_text())
        return metrics, metrics
    selection = score_split(
        model,
        processor,
        data_root,
        sel,
        out_dir / SELECTION_ROWS,
        out_dir / SELECTION_METRICS_FILE,
        on_reject,
    )
    return metrics, selection


def score_split(
    model, processor, data_root: Path, cfg: EvaluateConfig, rows_dir: Path, metrics_path: Path,
    on_reject=None,
) -> dict[str, Any]:  # fmt: skip
    """Answer and score ``cfg.split`` with a loaded policy: rows to ``rows_dir`` (data.jsonl,
    grounding.jsonl), the flat metrics to ``metrics_path``; returns them with
    ``samples_per_second``."""
    records, images = _readable_records(data_root, cfg, on_reject)
    t0 = time.perf_counter()
    preds = generate(
        model,
        processor,
        images,
        [r.question for r in records],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    seconds = time.perf_counter() - t0
    rows = [_scored_row(r, outs[0]) for r, outs in zip(records, preds, strict=True)]
    metrics = answer_metrics(records, rows)
    reports = [(r, row["prediction"]) for r, row in zip(records, rows) if r.answer_type == "report"]
    rep = report_metrics([p for _, p in reports], [r.answer for r, _ in reports])
    for k in REPORT_KEYS:
        metrics[k] = round(rep[k], 4) if k in rep else None
    metrics |= _llm_judged(cfg, records, rows, reports, on_reject)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if cfg.grounding:
        predictions = {row["id"]: row["prediction"] for row in rows}
        g_metrics, g_rows = measure_grounding(
            model, processor, data_root, records, predictions, cfg
        )
        metrics.update(g_metrics)
        write_jsonl(rows_dir / "grounding.jsonl", g_rows)
    write_jsonl(rows_dir / "data.jsonl", rows)
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # Timing stays out of metrics.json: the stage's content (and so every downstream key) must
    # not change when an evaluation is recomputed. The caller puts it in the manifest.
    return {**metrics, "samples_per_second": round(len(records) / max(seconds, 1e-9), 2)}


def _readable_records(data_root: Path, cfg: EvaluateConfig, on_reject) -> tuple[list, list]:
    """The split's records whose image opens, with the images. An unreadable image costs its
    record (a reject naming the file), not the evaluation."""
    records = load_records(data_root, splits=(cfg.split,), on_reject=on_reject)
    if cfg.max_samples:
        records = records[: cfg.max_samples]
    images, kept = [], []
    for r in records:
        try:
            images.append(open_image(data_root, r.image))
        except ValueError as e:
            if on_reject is None:
                raise
            on_reject(r.id, str(e))
            continue
        kept.append(r)
    return kept, images


def _scored_row(r, prediction: str) -> dict[str, Any]:
    return {
        "id": r.id,
        "answer_type": r.answer_type,
        "question_type": r.question_type,
        "question": r.question,
        "answer": r.answer,
        "prediction": prediction,
        **score(r.answer_type, prediction, r.answer),
    }


def answer_metrics(records: list, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Closed accuracy (overall, lesion questions, modality: each with n and a 95% Wilson
    interval), open exact / recall / F1, and the same per question type."""
    by_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r, row in zip(records, rows, strict=True):
        for k in ("correct", "exact", "recall", "f1"):
            if k in row:
                by_type[r.answer_type][k].append(row[k])
                by_type[f"{r.answer_type}/{r.question_type}"][k].append(row[k])
    metrics: dict[str, Any] = {
        "closed_accuracy": _mean(by_type["closed"]["correct"]),
        "open_exact_match": _mean(by_type["open"]["exact"]),
        "open_recall": _mean(by_type["open"]["recall"]),
        "open_f1": _mean(by_type["open"]["f1"]),
        "n_closed": len(by_type["closed"]["correct"]),
        "n_open": len(by_type["open"]["exact"]),
        "n_report": len(by_type["report"]["f1"]),
    }
    # Lesion questions apart from modality (a global feature the base always gets right).
    closed_rows = [(r, row) for r, row in zip(records, rows) if r.answer_type == "closed"]
    metrics |= rate_with_ci("closed_accuracy", [bool(row["correct"]) for _, row in closed_rows])
    metrics |= rate_with_ci(
        "closed_lesion_accuracy",
        [bool(row["correct"]) for r, row in closed_rows if r.question_type != "modality"],
    )
    metrics |= rate_with_ci(
        "closed_modality_accuracy",
        [bool(row["correct"]) for r, row in closed_rows if r.question_type == "modality"],
    )
    # Per question type, e.g. closed_presence_accuracy, open_location_exact.
    for name, vals in sorted(by_type.items()):
        kind, _, qtype = name.partition("/")
        if qtype and kind == "closed":
            metrics[f"closed_{qtype}_accuracy"] = _mean(vals["correct"])
        elif qtype and kind == "open":
            metrics[f"open_{qtype}_exact"] = _mean(vals["exact"])
    return metrics


def _llm_judged(cfg: EvaluateConfig, records, rows, reports, on_reject) -> dict[str, Any]:
    """Open answers judged by an LLM and reports scored GREEN-style, when configured; the
    per-record verdicts are added to ``rows``."""
    metrics: dict[str, Any] = {}
    if cfg.llm_judge is not None:
        items = [
            OpenItem(r.id, r.question, r.answer, row["prediction"])
            for r, row in zip(records, rows)
            if r.answer_type == "open"
        ]
        verdicts = judge_open_answers(cfg.llm_judge, items, on_reject)
        for row in rows:
            if row["id"] in verdicts:
                row["llm_correct"] = verdicts[row["id"]]
        metrics["open_llm_accuracy"] = _mean([float(v) for v in verdicts.values()])
        metrics["n_open_llm_judged"] = len(verdicts)
    if cfg.green is not None:
        items = [ReportItem(r.id, r.answer, p) for r, p in reports]
        green = green_scores(cfg.green, items, on_reject)
        for row in rows:
            if row["id"] in green:
                row["green"] = green[row["id"]]
        metrics["report_green"] = _mean([g["green"] for g in green.values()])
        metrics["n_report_green"] = len(green)
    return metrics
