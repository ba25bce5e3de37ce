"""Schema of the logger group (``conf/logger``): W&B or none."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


LOGGER_NAMES = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
ARTIFACT_MODES = ("auto", "upload", "reference", "none")  # logger.artifacts, see marl_exp.run.lineage


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "marl-exp"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # auto = online when W&B credentials exist, otherwise offline.
    mode: str = "auto"
    # Stage outputs as W&B artifacts (lineage): auto = upload files up to artifact_max_upload_mb and
    # reference bigger ones by file:// + checksum; upload | reference = all files one way; none = off.
    artifacts: str = "auto"
    artifact_max_upload_mb: float = 100.0

