"""Schemas of the stages that run a TRL trainer (SFT, reward) and of ``upstream``, the settings of the upstream
stages the stage cache builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from marl_exp.config.models import AdapterConfig


@dataclass
class TrainerStageConfig:
    """Hyper-parameters of the stages that run a TRL trainer (SFT and reward)."""

    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 64
    gradient_checkpointing: bool = False
    logging_steps: int = 10


@dataclass
class SFTStageConfig(TrainerStageConfig):
    name: str = "sft"
    # full | lora (with the `adapter` group) | auto = full, or lora when the base is quantized
    finetune: str = "auto"


@dataclass
class RewardStageConfig(TrainerStageConfig):
    name: str = "reward"
    # SFT model directory or hub id; empty = run (or reuse) the SFT stage through the stage cache.
    sft_model: Optional[str] = None
    # Lower than SFT's: the one-word edits among the pairs (data.pair_edit_prob) need small steps (docs/results.md).
    learning_rate: float = 1e-3
    num_train_epochs: float = 5.0
    center_rewards_coefficient: Optional[float] = 0.01


# The upstream stages a run builds say which adapter and quantization they use: ``upstream.reward.adapter.r=8``,
# ``upstream.sft.quant=4bit``. Changing a default changes the hash of every cache entry built with it.
UPSTREAM_ONLY_KEYS = ("adapter", "quant")  # keys of an upstream node that are not stage hyper-parameters


@dataclass
class UpstreamSFTConfig(SFTStageConfig):
    # LoRA of the SFT stage when it fine-tunes through an adapter (finetune=lora, or auto on 8/4-bit).
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # Weights SFT trains on: fp32 (full fine-tune), or 8bit/4bit for QLoRA-style SFT (merged into fp32).
    quant: str = "fp32"


@dataclass
class UpstreamRewardConfig(RewardStageConfig):
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # the reward adapter's LoRA
    # same = this run's quant group (the quantization PPO will score under), or fp32 | bf16 | 8bit | 4bit.
    quant: str = "same"


@dataclass
class UpstreamConfig:
    """How the stage cache builds upstream stages: ``upstream.sft.learning_rate=5e-5`` for a real model."""

    sft: UpstreamSFTConfig = field(default_factory=UpstreamSFTConfig)
    reward: UpstreamRewardConfig = field(default_factory=UpstreamRewardConfig)

