"""Typed configuration: one pydantic model per stage plus the cycle config that holds them.

Load a recipe with :func:`load_config` (YAML file, optional dotted overrides)::

    from fire_mpo_core.config import load_config
    cfg = load_config("configs/default.yaml", overrides={"rounds": 2})

Every model forbids unknown keys and validates types and ranges, so a typo or a negative size
fails at load time with the file and the dotted field path in the message.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

StageName = Literal[
    "prepare", "sft", "sample", "judge", "corrupt", "reference", "train", "evaluate"
]
STAGES: tuple[StageName, ...] = (
    "prepare",
    "sft",
    "sample",
    "judge",
    "corrupt",
    "reference",
    "train",
    "evaluate",
)
#: Stages that run once per cycle (round 0) rather than once per round.
SETUP_STAGES: tuple[StageName, ...] = ("prepare", "sft")


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Cfg):
    """What the `prepare` stage generates (SynthLesion) or loads."""

    dataset: Literal["synthlesion", "slake", "vqarad", "iuxray", "hf_disk", "jsonl"] = Field(
        default="synthlesion",
        description="synthlesion (generated offline; the size fields below apply) or a real "
        "dataset read from `path` in its own layout (fire_mpo_core.data.loaders).",
    )
    path: Path | None = Field(
        default=None,
        description="Local folder of the real dataset (e.g. data/Slake1.0); required unless "
        "dataset is synthlesion. Its files are linked or copied into the prepare stage folder.",
    )
    lang: str | None = Field(
        default="en", description="SLAKE: question language kept (None: all languages)."
    )
    annotation: str | None = Field(
        default=None, description="IU X-Ray: annotation file name inside `path` (default: auto)."
    )
    max_records_per_split: int | None = Field(
        default=None, ge=1, description="Real datasets: keep at most this many records per split."
    )
    image_size: int = Field(default=64, ge=32, le=512, description="Square image side in pixels.")
    n_train_images: int = Field(default=400, ge=1, description="Scans in the train split.")
    n_val_images: int = Field(default=40, ge=0, description="Scans in the validation split.")
    n_test_images: int = Field(default=120, ge=1, description="Scans in the test split.")
    questions_per_image: int = Field(
        default=4, ge=1, le=16, description="VQA questions drawn per scan."
    )
    report_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Share of scans that also get a report record."
    )
    sentence_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of question phrasings whose answers are model-style sentences ('Upper "
        "left, based on the image.') instead of the bare answer: response tokens outside the "
        "clinical spans, where span-level and sequence-level losses differ.",
    )
    language_prior: float = Field(
        default=0.8,
        ge=0.5,
        le=1.0,
        description="Train-only skew of guessable question types (0.5 = none); test is balanced.",
    )
    seed: int = Field(default=0, description="Generator seed; same seed, same bytes.")

    def fingerprint(self) -> str | None:
        """For real datasets: a digest of (relative path, size, mtime) of every file under
        `path`, which the flow adds to the prepare stage's key (None for SynthLesion)."""
        if self.path is None:
            return None
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    @model_validator(mode="after")
    def _path_for_real_data(self) -> DataConfig:
        if self.dataset != "synthlesion" and self.path is None:
            raise ValueError(f"data.path is required when data.dataset is {self.dataset!r}")
        if self.dataset == "synthlesion" and self.path is not None:
            raise ValueError("data.path is set but data.dataset is 'synthlesion' (generated)")
        return self


class ModelConfig(_Cfg):
    """The base LVLM: a tiny model built offline, or a real checkpoint by path / hub id."""

    name_or_path: str | None = Field(
        default=None,
        description="Checkpoint path or hub id; None builds the tiny model in `prepare`.",
    )
    arch: Literal[
        "llava", "llava_mistral", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3",
        "internvl",
    ] = Field(
        default="llava",
        description="Architecture of the tiny model built when no path is given: LLaVA with a "
        "Llama (llava) or Mistral (llava_mistral) decoder, Qwen2-VL, Qwen2.5-VL, Qwen3-VL "
        "(deepstack), Gemma 3, Idefics3 (SmolVLM), InternVL (fire_mpo_core.models.families).",
    )  # fmt: skip
    model_type: str | None = Field(
        default=None,
        description="transformers model_type of the checkpoint at name_or_path (e.g. qwen2_5_vl, "
        "qwen3_vl); checked at load time against transformers' image-text-to-text auto mapping, "
        "without downloading anything. None: not checked.",
    )
    hidden_size: int = Field(default=192, ge=16, description="Tiny LM hidden size.")
    num_layers: int = Field(default=2, ge=1, description="Tiny LM decoder layers.")
    num_heads: int = Field(default=4, ge=1, description="Tiny LM attention heads.")
    vision_hidden_size: int = Field(default=64, ge=16, description="Tiny vision tower width.")
    vision_layers: int = Field(default=2, ge=1, description="Tiny vision tower layers.")
    patch_size: int = Field(default=8, ge=2, description="Vision patch size in pixels.")
    vocab_size: int = Field(default=1024, ge=128, description="Tokenizer vocabulary to train.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype: float32 on CPU, bfloat16 on GPU."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow hub code execution; off unless you trust the repo."
    )
    seed: int = Field(default=0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.model_type is not None:
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
            )

            if self.model_type not in IMAGE_TEXT:
                raise ValueError(
                    f"model_type={self.model_type!r} is not an image-text-to-text architecture "
                    "of this transformers version (AutoModelForImageTextToText); known e.g. "
                    "qwen2_5_vl, qwen3_vl, qwen2_vl, llava"
                )
        return self


#: Tiny architectures whose vision warm start is implemented and tested (LLaVA's per-patch and
#: Qwen2-VL's merged-patch features); the other families skip it under ``enabled: auto``.
WARMUP_ARCHS = frozenset({"llava", "llava_mistral", "qwen2_vl"})


class VisionWarmupConfig(_Cfg):
    """Dense pretraining of the tiny model's vision tower + projector before SFT
    (fire_mpo_core.training.vision_warmup): a stand-in for a real model's pretrained encoder."""

    enabled: bool | Literal["auto"] = Field(
        default="auto",
        description="auto: on for the tiny model built in `prepare` on SynthLesion, off for a "
        "real checkpoint (model.name_or_path set) or a real dataset; true forces it (needs "
        "SynthLesion lesion masks); false skips it.",
    )
    steps: int = Field(default=2000, ge=1, description="Optimizer steps of the warm start.")
    batch_size: int = Field(default=32, ge=1, description="Images per step.")
    lr: float = Field(default=3e-3, gt=0, description="Peak AdamW learning rate (cosine decay).")
    pretrain_scans: int = Field(
        default=6000,
        ge=0,
        description="Extra generated scans from SynthLesion's own `pretrain` seed stream (no "
        "split's images), added to the train scans: the images a real encoder was pretrained on.",
    )
    polarity_weight: float = Field(
        default=0.5, ge=0, description="Weight of the per-token lesion polarity loss."
    )
    modality_weight: float = Field(
        default=0.5, ge=0, description="Weight of the image-level modality loss (global features)."
    )
    count_weight: float = Field(
        default=0.5, ge=0, description="Weight of the image-level lesion count (0/1/2) loss."
    )
    position_weight: float = Field(
        default=0.5,
        ge=0,
        description="Weight of the per-token own-quadrant loss (features that say where they are).",
    )
    seed: int = Field(default=0, description="Data order, flips and head initialisation seed.")

    def active(self, tiny_model: bool, dataset: str, arch: str = "llava") -> bool:
        """``auto``: on only for the tiny model built in ``prepare`` on SynthLesion (a real
        checkpoint already has a pretrained encoder; a real dataset has no dense targets), of
        an architecture the warm start reads features from (:data:`WARMUP_ARCHS`)."""
        if self.enabled == "auto":
            return tiny_model and dataset == "synthlesion" and arch in WARMUP_ARCHS
        return bool(self.enabled)


class SFTConfig(_Cfg):
    """Supervised warm start of the tiny base policy (skipped for real checkpoints)."""

    vision_warmup: VisionWarmupConfig = Field(
        default_factory=VisionWarmupConfig,
        description="Dense vision pretraining before SFT (the tiny default's stand-in encoder).",
    )
    train_vision: bool = Field(
        default=True,
        description="Also update the vision tower + projector during SFT (false: only the decoder "
        "learns, the warm-started features stay as pretrained).",
    )

    enabled: bool = Field(default=True, description="Run SFT; off for already-tuned checkpoints.")
    epochs: float = Field(default=2.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(default=32, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(default=0.05, ge=0, le=1, description="Linear warmup share.")
    max_length: int = Field(default=256, ge=16, description="Max tokens per sequence.")
    include_reports: bool = Field(default=True, description="Train on report records too.")
    seed: int = Field(default=0, description="Data order and dropout seed.")


from fire_mpo_core.openai_client import OpenAIEndpointConfig  # noqa: E402

#: `prepare` of a real dataset fails when it rejects more than this share of the records, unless
#: `max_reject_fraction` says otherwise: a folder with most images missing trained a model on
#: the 12% that were left, and the round lowered every metric without a word of warning.
REAL_DATA_REJECT_BUDGET = 0.5


class EvaluateConfig(_Cfg):
    """Benchmark evaluation of a policy on a split."""

    split: Literal["val", "test"] = Field(default="test", description="Split to evaluate.")
    batch_size: int = Field(default=64, ge=1, description="Prompts per generate call.")
    max_new_tokens: int = Field(default=48, ge=1, description="Generation budget per answer.")
    max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N records (None: all)."
    )
    grounding: bool = Field(
        default=True,
        description="Measure visual grounding: sensitivity to lesion removal, blind accuracy on "
        "blank images, lesion attention ratio per layer (fire_mpo_core.evaluation.grounding).",
    )
    grounding_max_samples: int = Field(
        default=64, ge=1, description="Records per grounding measurement (evenly spaced subset)."
    )
    removal_dilate_px: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Grow the lesion mask by this many pixels before removing it for the "
        "grounding probes: a lesion's soft rim lies outside its mask (measured on SynthLesion: "
        "inpainting the bare mask leaves a third of the lesion contrast, 2 px removes it).",
    )
    sensitivity_corruption: Literal["inpaint", "black"] = Field(
        default="inpaint",
        description="How a lesion is removed for the grounding probes: inpaint (filled from the "
        "surrounding tissue) or black (zeroed).",
    )
    blind_fill: int = Field(
        default=128, ge=0, le=255, description="Grey level of the blank image for blind accuracy."
    )
    llm_judge: OpenAIEndpointConfig | None = Field(
        default=None,
        description="OpenAI-compatible endpoint that judges open answers (open_llm_accuracy); "
        "None: off.",
    )
    green: OpenAIEndpointConfig | None = Field(
        default=None,
        description="OpenAI-compatible endpoint for the GREEN-style report score (report_green); "
        "None: off.",
    )


# Stage configs owned by their packages. Imported here, after the models above, because those
# packages import ModelConfig & co. from this module (the cycle config only aggregates them).
from fire_mpo_core.corruption.batch import CorruptConfig  # noqa: E402
from fire_mpo_core.judge.base import JudgeConfig  # noqa: E402
from fire_mpo_core.sampling.config import SampleConfig  # noqa: E402
from fire_mpo_core.training.config import TrainConfig  # noqa: E402


class CycleConfig(_Cfg):
    """The full cycle: setup stages, then `rounds` rounds of on-policy alignment."""

    run: str = Field(
        default="default", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name in the store."
    )
    store: Path = Field(default=Path("store"), description="Artifact store root folder.")
    rounds: int = Field(default=1, ge=0, description="On-policy rounds after the setup stages.")
    seed: int = Field(default=0, description="Global seed; stage seeds default from it.")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per stage; 1 is fastest for the tiny model on 2 cores "
        "(oversubscribed threads spin). None: torch's default.",
    )
    stages: list[StageName] | None = Field(
        default=None, description="Run only these stages (their inputs must exist); None: all."
    )
    max_reject_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fail a stage (with a summary of the reasons) when it rejects more than this "
        "share of its records; None: no limit (rejects are still listed in rejects.jsonl), "
        f"except `prepare` of a real dataset (data.path), limited to {REAL_DATA_REJECT_BUDGET} "
        "(set 1.0 to accept any share).",
    )
    remote_stages: dict[StageName, str] = Field(
        default_factory=dict,
        description="Stages run through a Prefect deployment instead of in the flow run, e.g. "
        "{train: fire-mpo/stage-train-gpu} (the GPU pool): the flow calls `run_deployment` and "
        "waits. The store must be one path that both workers see; it is checked at the start.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    corrupt: CorruptConfig = Field(default_factory=CorruptConfig)
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Preference training; the `reference` stage derives its settings from it.",
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("remote_stages")
    @classmethod
    def _deployment_names(cls, v: dict[str, str]) -> dict[str, str]:
        for stage, name in v.items():
            if not re.fullmatch(r"[^/\s]+/[^/\s]+", name):
                raise ValueError(f"{stage}: {name!r} is not a deployment name '<flow>/<name>'")
        return v


class ConfigError(ValueError):
    """A config file failed validation; the message names the file and each bad field."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        # Never echo what might be a secret pasted into a key/token field.
        secret = any(w in loc.lower() for w in ("key", "token", "secret", "password"))
        shown = "" if isinstance(got, dict | list) or secret else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> CycleConfig:
    """Load and validate a cycle config from YAML, applying dotted-key overrides.

    Raises:
        ConfigError: naming the file and the dotted path of every invalid field.
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {p}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"invalid config {p}: top level must be a mapping")
        data = loaded or {}
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    try:
        return CycleConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
