"""Every option of every config group composes and validates; bad values fail with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from conftest import CONF_DIR, REPO, compose
from marl_exp.config import ConfigError, validate

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml"))
                and p.name not in ("experiment", "debug", "hydra"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    cfg = compose(f"{group}={option}")
    validate(cfg)
    # The chosen file's values are what the composed group holds (typed by its schema).
    declared = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    declared.pop("defaults", None)
    for key, value in declared.items():
        assert cfg[group][key] == value


def test_defaults_are_tiny_model_and_reviews_task():
    cfg = compose()
    assert cfg.model.path == "builtin:tiny" and cfg.data.name == "reviews" and cfg.logger.name == "wandb"


def test_ppo_with_4bit_composes():
    cfg = compose("stage=ppo", "quant=4bit")
    validate(cfg)
    assert cfg.stage.name == "ppo" and cfg.quant.mode == "4bit" and cfg.quant.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("override", ["adapter.r=eight", "stage.batch_size=1.5", "quant.bnb_4bit_use_double_quant=maybe"])
def test_wrong_types_are_rejected_on_compose(override):
    with pytest.raises(Exception, match=f"Error merging override {override}") as err:
        compose(override)
    assert isinstance(err.value.__cause__, ValidationError)  # OmegaConf's type check, from the schema


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="adapter.rank") as err:
        compose("adapter.rank=8")
    assert isinstance(err.value.__cause__, ConfigAttributeError)  # not in the schema


@pytest.mark.parametrize("overrides,match", [
    (["adapter.r=0"], "adapter.r=0 must be > 0"),
    (["adapter.lora_dropout=1.0"], r"adapter.lora_dropout=1.0 must be in \[0, 1\)"),
    (["quant=4bit", "quant.bnb_4bit_quant_type=int3"], "quant.bnb_4bit_quant_type='int3'"),
    (["quant.mode=3bit"], "quant.mode='3bit'"),
    (["stage=sft", "quant=4bit", "stage.finetune=full"], "stage.finetune=full cannot train 4bit"),
    (["stage.learning_rate=-1"], "stage.learning_rate=-1"),
    (["logger.mode=sometimes"], "logger.mode='sometimes'"),
    (["stage=reward", "stage.sft_model=/does/not/exist"], "stage.sft_model='/does/not/exist' does not exist"),
    (["data.pair_min_gap=1.5"], "data.pair_min_gap=1.5"),
    (["adapter.target_modules=[]"], "adapter.target_modules is empty"),
])
def test_bad_values_raise_one_line_config_error(overrides, match):
    cfg = compose(*overrides)
    with pytest.raises(ConfigError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "adapter.r=0", "logger=none", f"output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert errors == ["marl-exp: error: adapter.r=0 must be > 0; a LoRA rank such as 8 or 16"]
    assert "Traceback" not in proc.stderr
