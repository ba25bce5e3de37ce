"""The primary config (every group's node and the run-wide keys), the stage schemas by name, and their
registration in Hydra's ConfigStore."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from marl_exp.config.command_line import sweep_label
from marl_exp.config.data import DataConfig
from marl_exp.config.logger import LoggerConfig
from marl_exp.config.models import AdapterConfig, ModelConfig, QuantConfig
from marl_exp.config.rl_stages import GRPOStageConfig, PPOStageConfig, ReinforcePPStageConfig, RLOOStageConfig
from marl_exp.config.trainer_stages import RewardStageConfig, SFTStageConfig, UpstreamConfig

STAGE_SCHEMAS = {"sft": SFTStageConfig, "reward": RewardStageConfig, "ppo": PPOStageConfig,
                 "grpo": GRPOStageConfig, "rloo": RLOOStageConfig, "reinforce_pp": ReinforcePPStageConfig}


@dataclass
class Config:
    model: ModelConfig = MISSING
    quant: QuantConfig = MISSING
    adapter: AdapterConfig = MISSING
    stage: Any = MISSING  # one of STAGE_SCHEMAS, typed by its own group schema
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    # Root of every output: run dirs, multiruns and the stage cache. By default $MARL_EXP_OUTPUT_DIR, else
    # <project root>/outputs: the same cache whatever directory a run starts from.
    output_dir: str = "${oc.env:MARL_EXP_OUTPUT_DIR,${marl_exp.project_root:}/outputs}"
    run_name: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda
    # torch/OpenMP threads: auto (fits the machine and parallel jobs, see marl_exp.run.threads) or a number.
    threads: str = "auto"
    # Settings of the upstream stages a run builds through the stage cache (e.g. SFT for PPO).
    upstream: UpstreamConfig = field(default_factory=lambda: UpstreamConfig())


def project_root() -> Path:
    """The checkout this package runs from (the dir holding ``conf/``), else the working directory."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "conf").is_dir() else Path.cwd()


def register_configs() -> None:
    """Each schema as ``<group>/schema`` (``stage/<name>_schema``), extended by the YAML files of its group, and
    the resolvers the primary config and ``conf/hydra`` use."""
    if not OmegaConf.has_resolver("marl_exp.project_root"):
        OmegaConf.register_new_resolver("marl_exp.project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("marl_exp.sweep_label"):
        OmegaConf.register_new_resolver("marl_exp.sweep_label", sweep_label)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="quant", name="schema", node=QuantConfig)
    cs.store(group="adapter", name="schema", node=AdapterConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    for name, schema in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"{name}_schema", node=schema)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)

