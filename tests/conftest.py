"""Shared fixtures: an isolated model cache, W&B offline, Hydra compose, and one trained SFT → reward chain."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# Before anything imports wandb or builds the tiny model.
os.environ.setdefault("MARL_EXP_CACHE", str(REPO / ".pytest_cache" / "marl-exp-models"))
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
# wandb stages artifact files for upload under ~/.local/share/wandb until a sync; keep them out of HOME.
os.environ.setdefault("WANDB_DATA_DIR", str(REPO / ".pytest_cache" / "wandb-data"))
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny matrices gain nothing from threads, and spinning threads slow everything on a busy CPU.
# Set before torch is imported; subprocesses (CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose(*overrides: str):
    """The config `python train.py <overrides>` would run with (Hydra's compose API)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


# Few steps and little data: the end-to-end tests check plumbing, not quality.
QUICK = ("logger=none", "stage.max_steps=3", "stage.batch_size=8", "stage.eval_batch_size=16",
         "data.num_sft_train=64", "data.num_sft_eval=16", "data.num_pairs_train=48", "data.num_pairs_eval=16")


@pytest.fixture(scope="session")
def trained_chain(tmp_path_factory):
    """A real SFT model and reward adapter trained with the default settings (fp32), via the stage cache."""
    from marl_exp.stages.pipeline import run_stage

    out = tmp_path_factory.mktemp("chain")
    cfg = compose("stage=reward", "logger=none", f"output_dir={out}")
    summary = run_stage(cfg, out / "reward_run")
    sft_dirs = list((out / "cache").glob("sft-*"))
    assert len(sft_dirs) == 1
    return {"sft_model": sft_dirs[0] / "model", "reward_adapter": out / "reward_run" / "reward_adapter",
            "reward_summary": summary, "sft_summary_path": sft_dirs[0] / "summary.json", "cfg": cfg}


@pytest.fixture(scope="session")
def sft(trained_chain) -> str:
    return str(trained_chain["sft_model"])


@pytest.fixture(scope="session")
def reward_dir(trained_chain) -> str:
    return str(trained_chain["reward_adapter"])


@pytest.fixture(scope="session")
def tokenizer(sft):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sft)
