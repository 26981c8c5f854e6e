"""The model card of a promoted adapter: ``README.md`` in the Hugging Face model-card layout.

    from fire_mpo_core.loop.card import model_card
    text = model_card(train_dir, evaluate_dir, round_=2, metric="grounded_accuracy")

YAML front matter (``base_model``, ``library_name: peft``, ``tags``, ``datasets``,
``model-index`` with the validation and test metrics), then what it is, how to load it, training
(this round's `train` config, loss, rounds), data, evaluation (validation AND test, each rate
with n and its 95% Wilson interval) and the code version (the train manifest's code version and
store key). Everything is read from the finished stage folders, so the card says what the store
holds. It replaces peft's generic card in ``adapter/`` (peft writes one on every save); the
store leaves model cards out of content digests (fire_mpo_core/store.py), so writing it moves
no key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fire_mpo_core.evaluation.config import SELECTION_METRICS
from fire_mpo_core.policy import ADAPTER_CONFIG
from fire_mpo_core.store import input_dirs, read_manifest

CARD = "README.md"
CARD_TITLE = "# FiRe-MPO LoRA adapter"  # how a card of ours is told from peft's
TAGS = ["fire-mpo", "medical", "vision-language", "lora", "peft", "dpo", "preference-optimization"]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _front_matter(
    base: str, dataset: str, name: str, val: dict, test: dict, split: str
) -> dict[str, Any]:
    results = []
    for metrics, which in ((val, "validation"), (test, split)):
        shown = [m for m in SELECTION_METRICS if metrics.get(m) is not None]
        if not shown:
            continue
        results.append(
            {
                "task": {"type": "visual-question-answering", "name": "Medical VQA"},
                "dataset": {"name": f"{dataset} ({which})", "type": dataset, "split": which},
                "metrics": [
                    {"type": m, "name": f"{m} ({which})", "value": metrics[m]} for m in shown
                ],
            }
        )
    return {
        "base_model": base,
        "library_name": "peft",
        "pipeline_tag": "image-text-to-text",
        "tags": TAGS,
        "datasets": [dataset],
        "model-index": [{"name": name, "results": results}],
    }


def _cell(metrics: dict, m: str) -> str:
    v = metrics.get(m)
    if v is None:
        return "– | – | –"
    lo, hi = metrics.get(f"{m}_ci_low"), metrics.get(f"{m}_ci_high")
    ci = f"[{lo}, {hi}]" if lo is not None else "–"
    return f"{v} | {metrics.get(f'{m}_n', '–')} | {ci}"


def _eval_table(val: dict, test: dict, split: str) -> str:
    shown = [m for m in SELECTION_METRICS if val.get(m) is not None or test.get(m) is not None]
    if not shown:
        return "_No metrics were measured._"
    head = f"| metric | validation | n | 95% CI | {split} | n | 95% CI |\n|---|" + "---:|" * 6
    return "\n".join([head, *(f"| {m} | {_cell(val, m)} | {_cell(test, m)} |" for m in shown)])


def model_card(
    train_dir: Path, evaluate_dir: Path, round_: int, metric: str, run: str = "run"
) -> str:
    """The card of round ``round_``'s adapter (``train_dir/adapter``), promoted by ``metric``
    on the validation split of ``evaluate_dir``'s evaluation."""
    train_dir, evaluate_dir = Path(train_dir), Path(evaluate_dir)
    train_m, eval_m = read_manifest(train_dir), read_manifest(evaluate_dir)
    inputs = input_dirs(train_dir)
    data_cfg = read_manifest(inputs["prepare"])["config"].get("data", {})
    dataset = data_cfg.get("dataset", "unknown")
    base = _json(train_dir / "adapter" / ADAPTER_CONFIG).get("base_model_name_or_path", "?")
    val, test = _json(evaluate_dir / "val_metrics.json"), _json(evaluate_dir / "metrics.json")
    split = eval_m["config"].get("evaluate", {}).get("split", "test")
    train_cfg = train_m["config"]["train"]
    reference = "round k-1's policy" if "reference_policy" in inputs else "the SFT base"
    pairs_key = inputs["corrupt"].name if "corrupt" in inputs else "?"
    front = _front_matter(base, dataset, f"{run}-round-{round_}", val, test, split)
    fm = yaml.safe_dump(front, sort_keys=False)
    return f"""---
{fm}---

{CARD_TITLE}: run `{run}`, round {round_}

A LoRA adapter (PEFT) of `{base}`, aligned with FiRe-MPO preference optimisation
(arXiv 2606.12590) by the FiRe-MPO pipeline. It is the **best round** of run `{run}` by the
validation metric `{metric}` = {val.get(metric)} (higher is better), promoted to
`<store>/{run}/best`. Metrics of the test split are reported, never used to choose.

## How to load it

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{base}")
processor = AutoProcessor.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/adapter")  # this folder
```

The pipeline's own loader covers every supported family and the tiny embedded models:
`fire_mpo_core.models.load_model(base)` in place of `AutoModelForImageTextToText`
(`base_model` above is relative to this folder when it is a local path).

## Training

Round {round_} of on-policy preference optimisation: loss `{train_cfg["loss"]["name"]}`,
{train_m["counts"].get("steps", "?")} optimizer steps on {train_m["counts"].get("pairs", "?")}
pairs, trained from {"the SFT base" if round_ == 1 else f"round {round_ - 1}'s adapter"}; frozen
reference: {reference}. The `train` section of this round:

```yaml
{yaml.safe_dump(train_cfg, sort_keys=True).rstrip()}
```

## Data

Dataset `{dataset}`; minimal-edit preference pairs judged on the policy's own answers, with a
lesion-corrupted image v' per lesion scan (stage `corrupt`, key `{pairs_key}`).

## Evaluation

{_eval_table(val, test, split)}

## Code version

Stage `train`, store key `{train_m["key"]}`, code version `{train_m["code_version"]}`;
evaluation key `{eval_m["key"]}` (code version `{eval_m["code_version"]}`).
"""
