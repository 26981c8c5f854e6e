"""Policy references: which weights a stage produced, as a small `policy.json` in its folder.

A policy is a base model (a folder saved with `save_pretrained`, or a hub id on GPU machines)
plus an optional PEFT adapter folder. Relative paths are relative to the stage folder that holds
`policy.json`, so store folders can be moved or copied whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

POLICY_FILE = "policy.json"


class PolicyRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base model folder (relative to the stage folder) or hub id.")
    adapter: str | None = Field(default=None, description="PEFT adapter folder, if any.")
    trust_remote_code: bool = False

    def relative_to(self, stage_dir: Path) -> PolicyRef:
        """The policy as ``stage_dir``'s policy.json records it: local paths relative to that
        folder (so the store can move), hub ids as they are."""

        def rel(p: str | None) -> str | None:
            if p is None or not Path(p).exists():
                return p
            return Path(os.path.relpath(Path(p).resolve(), Path(stage_dir).resolve())).as_posix()

        return self.model_copy(update={"base": rel(self.base), "adapter": rel(self.adapter)})


def write_policy(stage_dir: Path, ref: PolicyRef) -> None:
    (Path(stage_dir) / POLICY_FILE).write_text(ref.model_dump_json(indent=2) + "\n")


def read_policy(stage_dir: Path) -> PolicyRef:
    """Read a stage's policy with local paths made absolute (hub ids are kept as they are)."""
    stage_dir = Path(stage_dir)
    ref = PolicyRef.model_validate(json.loads((stage_dir / POLICY_FILE).read_text()))

    def _abs(p: str | None) -> str | None:
        if p is None:
            return None
        local = stage_dir / p
        return str(local.resolve()) if local.exists() else p

    return ref.model_copy(update={"base": _abs(ref.base), "adapter": _abs(ref.adapter)})


ADAPTER_CONFIG = "adapter_config.json"


def make_adapter_relocatable(adapter_dir: Path) -> None:
    """peft writes the base model's path, as given, into ``adapter_config.json``
    (``base_model_name_or_path``): inside the store that is an absolute path, which points
    nowhere once the store is moved (another machine, the GPU pool's mount). Rewrite a local
    base as a path relative to the adapter folder; a hub id stays as it is. Consumers that need
    an absolute path resolve it with :func:`adapter_base`."""
    cfg_path = Path(adapter_dir) / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    base = cfg.get("base_model_name_or_path")
    if base and Path(base).is_absolute() and Path(base).exists():
        rel = os.path.relpath(base, Path(adapter_dir).resolve())
        cfg["base_model_name_or_path"] = rel
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        card = Path(adapter_dir) / "README.md"  # peft's model card names the base too
        if card.is_file():
            card.write_text(card.read_text().replace(base, rel))


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model of an adapter folder: a relative local path made absolute against the
    folder (see :func:`make_adapter_relocatable`), a hub id as it is."""
    base = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text()).get(
        "base_model_name_or_path"
    )
    if base is None:
        return None
    local = Path(adapter_dir) / base
    return str(local.resolve()) if not Path(base).is_absolute() and local.exists() else base
