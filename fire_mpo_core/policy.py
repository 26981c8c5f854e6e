"""Policy references: which weights a stage produced, as a small `policy.json` in its folder.

A policy is a base model (a folder saved with `save_pretrained`, or a hub id on GPU machines)
plus an optional PEFT adapter folder. Relative paths are relative to the stage folder that holds
`policy.json`, so store folders can be moved or copied whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

POLICY_FILE = "policy.json"


class PolicyRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="Base model folder (relative to the stage folder) or hub id.")
    adapter: str | None = Field(default=None, description="PEFT adapter folder, if any.")
    trust_remote_code: bool = False


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
