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
                and p.name not in ("experiment", "debug", "hydra", "sweep", "rewards"))  # rewards: test_reward_sources


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# Options that need a value only the user can give (data=local: which file).
REQUIRED = {("data", "local"): {"train_file": str(CONF_DIR.parent / "tests/fixtures/data/local/sft.jsonl")}}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    required = REQUIRED.get((group, option), {})
    cfg = compose(f"{group}={option}", *(f"{group}.{k}={v}" for k, v in required.items()))
    validate(cfg)
    # The chosen file's values are what the composed group holds (typed by its schema).
    declared = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    declared.pop("defaults", None)
    for key, value in declared.items():
        assert cfg[group][key] == required.get(key, value)


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
    (["stage.optim.learning_rate=-1"], "stage.optim.learning_rate=-1"),
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


# One row per bad config: the overrides, then the start of the one-line message (it names key and value).
BAD_CONFIGS = [
    (["stage.batch_size=8", "stage.optim.mini_batch_size=16"], "stage.optim.mini_batch_size=16 is larger than stage.batch_size=8"),
    (["stage.sampling.top_p=0"], "stage.sampling.top_p=0.0 must be in (0, 1]"),
    (["stage.sampling.top_p=1.5"], "stage.sampling.top_p=1.5 must be in (0, 1]"),
    (["stage.optim.learning_rate=-0.001"], "stage.optim.learning_rate=-0.001 must be > 0"),
    (["stage.kl.kl_penalty=foo"], "stage.kl.kl_penalty='foo' is not valid; use one of kl, abs, mse, full"),
    (["stage.policies=[]"], "stage.policies=[] must be a non-empty list of distinct names"),
    (["stage.policies=[a,a]"], "stage.policies=['a', 'a'] must be a non-empty list of distinct names"),
    (["stage.policies=[reward]"], "stage.policies=['reward']: names ending in _critic"),
    (["stage.critic=foo"], "stage.critic='foo' is not valid; use one of value_head, adapter"),
    (["stage.sharing=foo"], "stage.sharing='foo' is not valid; use one of shared, separate"),
    (["stage.resume=/nonexistent"], "stage.resume='/nonexistent' does not exist"),
    (["adapter.r=0"], "adapter.r=0 must be > 0"),
    (["adapter.lora_dropout=1"], "adapter.lora_dropout=1.0 must be in [0, 1)"),
    (["stage.optim.max_bad_steps=0"], "stage.optim.max_bad_steps=0 must be > 0"),
    (["stage.steps=0"], "stage.steps=0 must be > 0"),
    (["stage.kl.kl_estimator=k2"], "stage.kl.kl_estimator='k2' is not valid"),
    (["stage.optim.ratio_threshold=1"], "stage.optim.ratio_threshold=1.0 must be > 1"),
    (["stage.advantages.gamma=1.5"], "stage.advantages.gamma=1.5 and stage.advantages.lam=0.95 must be in [0, 1]"),
    (["stage.sampling.min_new_tokens=30"], "stage.sampling.min_new_tokens=30 must be in [0, stage.sampling.max_new_tokens=24]"),
    (["stage.optim.optimizer=sgd"], "stage.optim.optimizer='sgd' is not valid"),
    (["stage.optim.lr_scheduler=step"], "stage.optim.lr_scheduler='step' is not valid"),
    (["stage.sampling.top_k=-1"], "stage.sampling.top_k=-1 must be >= 0"),
    (["stage.batch_size=12", "stage.optim.mini_batch_size=6", "stage.optim.gradient_accumulation_steps=4"],
     "stage.optim.mini_batch_size=6 is not divisible by stage.optim.gradient_accumulation_steps=4"),
    (["stage.kl.target_kl=0"], "stage.kl.target_kl=0.0 must be > 0"),
    (["stage=sft", "stage.finetune=half"], "stage.finetune='half' is not valid"),
    (["stage=reward", "stage.warmup_ratio=1.0"], "stage.warmup_ratio=1.0 must be in [0, 1)"),
    (["data=reviews_chat", "data.pair_request_contrast_prob=1.5"], "data.pair_request_contrast_prob=1.5 must be in [0, 1]"),
    (["logger.name=tensorboard"], "logger.name='tensorboard' is not valid"),
    (["model.trust_remote_code=true"], "model.trust_remote_code=true runs code from the hub"),
    (["device=gpu"], "device='gpu' is not valid"),
    (["quant=4bit", "quant.bnb_4bit_compute_dtype=bfloat16", "device=cuda"],
     "quant.bnb_4bit_compute_dtype='bfloat16' does not run on this GPU (compute capability 7.5"),
    (["quant=bf16", "device=cuda"], "quant.mode='bf16' does not run on this GPU (compute capability 7.5"),
    (["logger.artifacts=sometimes"], "logger.artifacts='sometimes' is not valid"),
    (["logger.artifact_max_upload_mb=-1"], "logger.artifact_max_upload_mb=-1.0 must be >= 0"),
    (["data=local"], "data.train_file=None: data=local gives the sft stage no file"),
    (["data=local", "data.train_file=nowhere.csv"], "data.train_file='nowhere.csv' does not exist"),
    (["data.name=squad"], "data.name='squad' is not valid"),
    (["upstream.reward.batch_size=0"], "upstream.reward.batch_size=0 must be > 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_table(overrides, message, monkeypatch):
    import torch

    monkeypatch.delenv("MARL_EXP_ALLOW_REMOTE_CODE", raising=False)
    if "device=cuda" in overrides:  # a GPU without bfloat16 (a T4): faked, so the rule is tested on any machine
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text
    assert "=" in message.split()[0]  # every row's message opens with key=value


@pytest.mark.parametrize("overrides", [
    ["quant=4bit", "quant.bnb_4bit_compute_dtype=float32"],
    ["quant=4bit", "quant.bnb_4bit_compute_dtype=float16"],
    ["quant=4bit", "quant.bnb_4bit_compute_dtype=bfloat16"],
    ["quant=bf16"],
], ids=lambda overrides: " ".join(overrides))
def test_every_compute_dtype_is_accepted_on_cpu_and_runs_there(overrides):
    """validate() accepts every compute dtype on a CPU because each runs there: the tiny base, loaded as a
    run loads it, computes in that dtype through bitsandbytes' 4-bit CPU kernels (or bf16 weights), forward
    and backward into a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from marl_exp.modeling.loading import load_model, resolve_model_path

    cfg = compose(*overrides, "device=cpu")
    validate(cfg)
    base = load_model(resolve_model_path(cfg.model), cfg.model, cfg.quant, torch.device("cpu"))
    q_proj = base.model.layers[0].self_attn.q_proj
    if cfg.quant.mode == "4bit":
        import bitsandbytes as bnb

        assert isinstance(q_proj, bnb.nn.Linear4bit)
        assert q_proj.compute_dtype == getattr(torch, cfg.quant.bnb_4bit_compute_dtype)
    else:
        assert q_proj.weight.dtype == torch.bfloat16
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    logits = model(input_ids=torch.tensor([[1, 5, 9, 12, 7]])).logits
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).sum().backward()
    lora_b = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]  # lora_A's stays 0 while B is 0
    assert lora_b and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in lora_b)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_rejected():
    with pytest.raises(ConfigError, match="device='cuda' but no CUDA device is visible"):
        validate(compose("device=cuda"))


@pytest.mark.parametrize("overrides,message", [
    (["stage.sampling.top_p=1.5"], "stage.sampling.top_p=1.5 must be in (0, 1]"),
    (["stage.kl.kl_penalty=foo"], "stage.kl.kl_penalty='foo' is not valid; use one of kl, abs, mse, full"),
    (["stage.batch_size=8", "stage.optim.mini_batch_size=16"], "stage.optim.mini_batch_size=16 is larger than stage.batch_size=8"),
])
def test_cli_bad_ppo_config_exits_2_with_one_line(tmp_path, overrides, message):
    proc = subprocess.run([sys.executable, "train.py", *overrides, "logger=none", f"output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"marl-exp: error: {message}")
    assert "Traceback" not in proc.stderr


def test_flat_rl_settings_nest_under_their_headings():
    from marl_exp.config import nest_rl_keys

    nested = nest_rl_keys({"learning_rate": 1e-3, "steps": 4, "top_k": 5, "beta": 0.1, "cliprange": 0.3,
                           "eval_every": 2, "critic": "adapter"})
    assert nested == {"optim": {"learning_rate": 1e-3}, "steps": 4, "sampling": {"top_k": 5}, "kl": {"beta": 0.1},
                      "loss": {"cliprange": 0.3}, "eval": {"eval_every": 2}, "critic": "adapter"}


@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo", "reinforce_pp"])
def test_every_rl_stage_shares_the_sampling_optim_runtime_and_eval_headings(stage):
    cfg = compose(f"stage={stage}", "stage.sampling.max_new_tokens=7", "stage.optim.learning_rate=0.01",
                  "stage.runtime.gradient_checkpointing=true", "stage.eval.eval_every=3")
    validate(cfg)
    assert (cfg.stage.sampling.max_new_tokens, cfg.stage.optim.learning_rate, cfg.stage.runtime.gradient_checkpointing,
            cfg.stage.eval.eval_every) == (7, 0.01, True, 3)


@pytest.mark.parametrize("key", ["stage.sft_model", "stage.reward_adapter", "stage.rewards.extra.adapter"])
def test_a_home_relative_input_dir_is_found(tmp_path, monkeypatch, key):
    """``~`` is the home dir wherever a local path is checked (``provenance.looks_local``), as the model loads
    it: a given ``~/...`` dir that exists is not reported missing."""
    from marl_exp.config import declare_reward_sources

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "given").mkdir()
    validate(compose(*declare_reward_sources([f"{key}='~/given'"])))
    with pytest.raises(ConfigError, match=r"='~/missing' does not exist"):
        validate(compose(*declare_reward_sources([f"{key}='~/missing'"])))


def test_the_stage_graph_is_what_validation_the_plan_and_the_pipeline_read(tmp_path):
    """One graph: the upstream stages the CLI's plan lists are the inputs the pipeline resolves, for every stage
    and reward setup (given outputs, so nothing is built)."""
    from marl_exp.cli import upstream_sources
    from marl_exp.config import INPUT_KEY, needed_upstream
    from marl_exp.stages.pipeline import resolve_inputs

    given = [f"stage.sft_model={tmp_path}", f"stage.reward_adapter={tmp_path}"]
    cases = {("stage=sft",): (), ("stage=reward", given[0]): ("sft",), ("stage=grpo", *given): ("sft", "reward"),
             ("stage=ppo", given[0], "+rewards=oracle_strict"): ("sft",),
             ("stage=rloo", *given, "+rewards=monitor_gold"): ("sft", "reward")}
    for overrides, expected in cases.items():
        cfg = compose(*overrides, f"output_dir={tmp_path}")
        assert needed_upstream(cfg.stage) == expected
        assert tuple(upstream_sources(cfg)) == expected
        assert tuple(resolve_inputs(cfg)) == tuple(INPUT_KEY[name] for name in expected)
