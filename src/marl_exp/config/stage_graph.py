"""The stage graph: which stage reads which upstream outputs, what a stage key given by the user skips, where
each output lives in its run dir, and the hash that names an output. Config validation, the CLI's plan and the
stage pipeline all read it from here.

    sft  ->  reward  ->  ppo | grpo | rloo | reinforce_pp

An RL stage reads the SFT model and the reward adapter; the reward stage reads the SFT model. An upstream
output is given (``stage.sft_model``, ``stage.reward_adapter``) or built through the stage cache
(``<output_dir>/cache/<stage>-<config_hash>``). An RL stage whose ``stage.rewards`` reads no upstream reward
adapter (adapters given per source, functions) needs no reward stage.
"""

from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

from marl_exp.config.reward_sources import needs_upstream_reward

# The stages that train policies with RL on the SFT model against the reward (stages/rl.py).
RL_STAGES = ("ppo", "grpo", "rloo", "reinforce_pp")
CRITIC_FREE_STAGES = ("grpo", "rloo", "reinforce_pp")
UPSTREAM = {"sft": (), "reward": ("sft",), **{name: ("sft", "reward") for name in RL_STAGES}}  # in build order
INPUT_KEY = {"sft": "sft_model", "reward": "reward_adapter"}  # upstream stage -> the stage key that gives its output
OUTPUT_SUBDIR = {"sft": "model", "reward": "reward_adapter", **{name: "policies" for name in RL_STAGES}}
COMPLETE_MARKER = "summary.json"  # written last by every stage
CACHE_VERSION = 3  # bump when a stage's output (format or data) changes, so stale cache entries are not reused
HASHED_KEYS = ("model", "data", "seed", "quant", "adapter", "stage")  # what determines a stage's output


def needed_upstream(stage: DictConfig) -> tuple[str, ...]:
    """The upstream stages whose outputs ``stage`` reads, in build order: ``UPSTREAM``, less the reward stage
    when no reward source reads the upstream reward adapter."""
    names = UPSTREAM[stage.name]
    if stage.name in RL_STAGES and not needs_upstream_reward(stage):
        return tuple(name for name in names if name != "reward")
    return names


def given_output(stage: DictConfig, upstream: str) -> str | None:
    """The output of ``upstream`` the user gave (``stage.sft_model`` / ``stage.reward_adapter``), else None."""
    return stage.get(INPUT_KEY[upstream]) or None


def config_hash(cfg: DictConfig) -> str:
    """Hash of everything that determines a stage's output (not where it is logged or written): it names the
    stage's cache entry and its W&B artifact."""
    container = OmegaConf.to_container(cfg, resolve=True)
    content = {key: container[key] for key in HASHED_KEYS}
    content["cache_version"] = CACHE_VERSION
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
