"""Config loading: defaults, overrides, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from fire_mpo_core.config import ConfigError, CycleConfig, load_config
from testing_support import REPO


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_default_yaml_loads_and_matches_model_defaults():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert isinstance(cfg, CycleConfig)
    assert cfg.model.name_or_path is None and cfg.model.arch == "llava"
    assert cfg.data.image_size == 64


def test_overrides_use_dotted_keys(tmp_path):
    cfg = load_config(write(tmp_path, "rounds: 1\n"), {"rounds": 3, "sft.lr": 0.5})
    assert cfg.rounds == 3 and cfg.sft.lr == 0.5


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("data:\n  n_train_imags: 3\n", "data.n_train_imags", "Extra inputs are not permitted"),
        ("sft:\n  batch_size: many\n", "sft.batch_size", "valid integer"),
        ("data:\n  n_test_images: -5\n", "data.n_test_images", "greater than or equal to 1"),
        ("stages: [prepare, polish]\n", "stages.1", "prepare"),
        ("model:\n  hidden_size: 30\n  num_heads: 4\n", "model", "hidden_size (30)"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, text, field, fragment):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and field in msg and fragment in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_registry_names_are_checked_by_the_cycle_config_naming_the_field():
    """Judge and loss names are keys of their registries (JUDGES, LOSSES), checked at load."""
    with pytest.raises(ConfigError, match=r"train\.loss\.name 'bogus' is unknown; known: \["):
        load_config(overrides={"train.loss.name": "bogus"})
    with pytest.raises(ConfigError, match=r"judge\.name 'gpt' is unknown"):
        load_config(overrides={"judge.name": "gpt"})
