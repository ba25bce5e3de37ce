"""``validate(cfg)``: the cross-field rules, checked before any model or data is loaded; a ``ConfigError``
(one line naming the key, the value and the fix) on the first problem."""

from __future__ import annotations

import math
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from marl_exp.config.chat_templates import resolve_template
from marl_exp.config.data import DATA_FILE_FORMATS, DATA_NAMES, STAGE_FILE_KEYS
from marl_exp.config.keys import check_known_keys
from marl_exp.config.logger import ARTIFACT_MODES, LOGGER_NAMES, WANDB_MODES
from marl_exp.config.models import COMPUTE_DTYPES, QUANT_MODES
from marl_exp.config.primary import STAGE_SCHEMAS
from marl_exp.config.reward_sources import SOURCE_NAME, load_reward_function, reward_adapter_names, reward_sources
from marl_exp.config.rl_stages import ADVANTAGE_ESTIMATORS, LOSS_TYPES, SCALE_REWARDS
from marl_exp.config.stage_graph import CRITIC_FREE_STAGES, INPUT_KEY, RL_STAGES, UPSTREAM, given_output, needed_upstream
from marl_exp.errors import ConfigError
from marl_exp.provenance import looks_local


def validate(cfg: DictConfig) -> None:
    """Check cross-field rules before anything is loaded; raise ``ConfigError`` on the first problem."""
    check_known_keys(cfg)
    _one_of("quant.mode", cfg.quant.mode, QUANT_MODES)
    _one_of("quant.bnb_4bit_quant_type", cfg.quant.bnb_4bit_quant_type, ("nf4", "fp4"))
    _one_of("quant.bnb_4bit_compute_dtype", cfg.quant.bnb_4bit_compute_dtype, COMPUTE_DTYPES)
    _validate_adapter(cfg.adapter, "adapter")
    _one_of("logger.name", cfg.logger.name, LOGGER_NAMES)
    _one_of("logger.mode", cfg.logger.mode, WANDB_MODES)
    _one_of("logger.artifacts", cfg.logger.artifacts, ARTIFACT_MODES)
    _check(cfg.logger.artifact_max_upload_mb >= 0,
           f"logger.artifact_max_upload_mb={cfg.logger.artifact_max_upload_mb!r} must be >= 0")
    _one_of("device", cfg.device, ("auto", "cpu", "cuda"))
    _check(str(cfg.threads) == "auto" or (str(cfg.threads).isdigit() and int(cfg.threads) > 0),
           f"threads={cfg.threads!r} is not valid; use threads=auto or a number of threads >= 1 such as threads=2")
    _check_device_dtypes(cfg)
    _check(cfg.model.trust_remote_code is False or os.environ.get("MARL_EXP_ALLOW_REMOTE_CODE") == "1",
           "model.trust_remote_code=true runs code from the hub; set MARL_EXP_ALLOW_REMOTE_CODE=1 to allow it")

    stage = cfg.stage
    _one_of("stage.name", stage.name, tuple(STAGE_SCHEMAS))
    if stage.name in ("sft", "reward"):
        _validate_trainer_stage(stage, "stage", cfg.quant.mode)
    # Upstream stages the stage cache may build are checked now, not after an hour of training.
    for name in UPSTREAM[stage.name]:
        _validate_upstream(cfg, name)
    if stage.name == "ppo":
        _validate_ppo(stage)
    if stage.name in CRITIC_FREE_STAGES:
        _validate_critic_free(stage)
    for key in (INPUT_KEY[name] for name in UPSTREAM[stage.name]):
        path = stage.get(key)
        if path and looks_local(path):
            _check(os.path.isdir(os.path.expanduser(path)),
                   f"stage.{key}={path!r} does not exist; give an existing directory or hub id")
    if stage.name in RL_STAGES:
        _validate_rewards(stage)

    _validate_data(cfg.data)
    if cfg.data.name == "local":
        _validate_local_files(cfg)



def _validate_local_files(cfg: DictConfig) -> None:
    """data=local: every stage this run trains (upstream ones the stage cache builds included) has a file, its
    own (``data.<stage file key>``) or the shared ``data.train_file``."""
    data = cfg.data
    training = [name for name in needed_upstream(cfg.stage) if not given_output(cfg.stage, name)]
    for name in [*training, cfg.stage.name]:
        key = STAGE_FILE_KEYS["rl" if name in RL_STAGES else name]
        _check(bool(data[key] or data.train_file),
               f"data.train_file=None: data=local gives the {name} stage no file; set data.train_file=<json|jsonl|"
               f"csv|parquet file> (every stage's columns), or data.{key}=<file> for this stage")


def _validate_adapter(adapter: DictConfig, prefix: str) -> None:
    _positive(f"{prefix}.r", adapter.r, "a LoRA rank such as 8 or 16")
    _positive(f"{prefix}.lora_alpha", adapter.lora_alpha)
    _check(0 <= adapter.lora_dropout < 1, f"{prefix}.lora_dropout={adapter.lora_dropout!r} must be in [0, 1)")
    _one_of(f"{prefix}.bias", adapter.bias, ("none", "all", "lora_only"))
    _check(len(adapter.target_modules) > 0,
           f"{prefix}.target_modules is empty; name modules (e.g. [q_proj,v_proj]) or use [all-linear]")


def _validate_upstream(cfg: DictConfig, name: str) -> None:
    """``upstream.<name>``: the stage the cache may build, with its own adapter and quantization."""
    node, prefix = cfg.upstream[name], f"upstream.{name}"
    _one_of(f"{prefix}.quant", node.quant, (("same",) if name == "reward" else ()) + QUANT_MODES)
    _validate_trainer_stage(node, prefix, upstream_quant_mode(cfg, name))
    _validate_adapter(node.adapter, f"{prefix}.adapter")


def upstream_quant_mode(cfg: DictConfig, name: str) -> str:
    """The quant mode upstream stage ``name`` trains with (``same`` = this run's ``quant.mode``)."""
    mode = cfg.upstream[name].quant
    return cfg.quant.mode if mode == "same" else mode


def _validate_data(data: DictConfig) -> None:
    _validate_chat(data)
    _one_of("data.name", data.name, DATA_NAMES)
    _one_of("data.on_bad_row", data.on_bad_row, ("error", "skip"))
    if data.name in ("imdb", "hh_rlhf"):
        _check(bool(data.path), f"data.path={data.path!r}: data={data.name} needs a hub id or a local copy there")
    if data.name == "local":
        for key in ("train_file", "eval_file", *STAGE_FILE_KEYS.values()):
            path = data[key]
            if path is None:
                continue
            _check(os.path.splitext(path)[1].lower() in DATA_FILE_FORMATS,
                   f"data.{key}={path!r} has an unknown format; use {', '.join(DATA_FILE_FORMATS)}")
            _check(os.path.isfile(path), f"data.{key}={path!r} does not exist; give an existing file")
        _check(0 < data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction!r} must be in (0, 1)")
    else:
        for key in STAGE_FILE_KEYS.values():
            _check(data[key] is None, f"data.{key}={data[key]!r} is for data=local (data={data.name} gives every "
                   "stage its data); use data=local, or drop it")
    for key in ("max_train_samples", "max_eval_samples"):
        if data[key] is not None:
            _positive(f"data.{key}", data[key], "or null for all rows")
    _positive("data.prompt_words", data.prompt_words)
    for key in ("num_sft_train", "num_sft_eval", "num_pairs_train", "num_pairs_eval"):
        _positive(f"data.{key}", data[key])
    _one_of("data.pair_gold", data.pair_gold, ("strict", "plain"))
    _check(0 <= data.pair_min_gap < 1, f"data.pair_min_gap={data.pair_min_gap!r} must be in [0, 1)")
    _check(0 <= data.pair_negation_prob <= 1,
           f"data.pair_negation_prob={data.pair_negation_prob!r} must be in [0, 1]")
    _check(0 <= data.pair_splice_prob < 1, f"data.pair_splice_prob={data.pair_splice_prob!r} must be in [0, 1)")
    _check(0 <= data.pair_edit_prob < 1, f"data.pair_edit_prob={data.pair_edit_prob!r} must be in [0, 1)")
    _check(0 <= data.pair_request_contrast_prob <= 1,
           f"data.pair_request_contrast_prob={data.pair_request_contrast_prob!r} must be in [0, 1]")
    _check(0 <= data.pair_truncate_prob < 1,
           f"data.pair_truncate_prob={data.pair_truncate_prob!r} must be in [0, 1)")


def _validate_trainer_stage(stage: DictConfig, prefix: str, quant_mode: str) -> None:
    for key in ("learning_rate", "batch_size", "eval_batch_size", "max_length", "logging_steps"):
        _positive(f"{prefix}.{key}", stage[key])
    _check(stage.max_steps > 0 or stage.num_train_epochs > 0,
           f"{prefix}.num_train_epochs must be > 0 unless {prefix}.max_steps > 0")
    _check(stage.weight_decay >= 0, f"{prefix}.weight_decay={stage.weight_decay!r} must be >= 0")
    _check(0 <= stage.warmup_ratio < 1, f"{prefix}.warmup_ratio={stage.warmup_ratio!r} must be in [0, 1)")
    if stage.name == "sft":
        _one_of(f"{prefix}.finetune", stage.finetune, ("auto", "full", "lora"))
        fix = "quant=fp32" if prefix == "stage" else f"{prefix}.quant=fp32"
        _check(not (stage.finetune == "full" and quant_mode in ("8bit", "4bit")),
               f"{prefix}.finetune=full cannot train {quant_mode} quantized weights; "
               f"use {prefix}.finetune=lora or {fix}")


def _check_device_dtypes(cfg: DictConfig) -> None:
    """The device exists and can compute in the dtypes asked for.

    On a CPU every compute dtype runs (bitsandbytes 4-bit with float32, bfloat16 and float16 compute all
    do, forward and backward); on a GPU bfloat16 needs compute capability >= 8.0 (Ampere or newer).
    """
    quant = cfg.quant
    bf16 = quant.mode == "bf16" or (quant.mode == "4bit" and quant.bnb_4bit_compute_dtype == "bfloat16")
    if cfg.device == "cpu" or (cfg.device == "auto" and not bf16):
        return
    import torch

    cuda = torch.cuda.is_available()
    _check(cfg.device != "cuda" or cuda, "device='cuda' but no CUDA device is visible; use device=cpu or device=auto")
    if not cuda or not bf16 or torch.cuda.is_bf16_supported():
        return
    major, minor = torch.cuda.get_device_capability()
    if quant.mode == "4bit":
        _check(False, f"quant.bnb_4bit_compute_dtype='bfloat16' does not run on this GPU (compute capability "
                      f"{major}.{minor}, bfloat16 needs >= 8.0); use quant.bnb_4bit_compute_dtype=float16 or float32")
    _check(False, f"quant.mode='bf16' does not run on this GPU (compute capability {major}.{minor}, bfloat16 "
                  "needs >= 8.0); use quant=fp32, or quant=4bit with quant.bnb_4bit_compute_dtype=float16")


def _validate_ppo(stage: DictConfig) -> None:
    for key in ("optim.ppo_epochs", "loss.cliprange", "loss.cliprange_value"):
        _positive(f"stage.{key}", OmegaConf.select(stage, key))
    kl, adv = stage.kl, stage.advantages
    _check(0 <= adv.gamma <= 1 and 0 <= adv.lam <= 1,
           f"stage.advantages.gamma={adv.gamma!r} and stage.advantages.lam={adv.lam!r} must be in [0, 1]")
    _one_of("stage.kl.kl_penalty", kl.kl_penalty, ("kl", "abs", "mse", "full"))
    _one_of("stage.kl.kl_estimator", kl.kl_estimator, ("k1", "k3"))
    _check(kl.init_kl_coef >= 0, f"stage.kl.init_kl_coef={kl.init_kl_coef!r} must be >= 0")
    if kl.adaptive_kl:
        _positive("stage.kl.target_kl", kl.target_kl, "or set stage.kl.adaptive_kl=false")
        _positive("stage.kl.kl_horizon", kl.kl_horizon, "or set stage.kl.adaptive_kl=false")
    _one_of("stage.critic", stage.critic, ("value_head", "adapter"))
    _validate_shared_rl(stage)


def _validate_shared_rl(stage: DictConfig) -> None:
    """Rules every RL stage shares: batches, sampling, roles, optimizer, resume."""
    for key in ("steps", "batch_size", "optim.mini_batch_size", "optim.gradient_accumulation_steps",
                "sampling.max_new_tokens", "sampling.temperature", "optim.max_grad_norm", "eval.eval_samples",
                "log_every", "optim.max_bad_steps", "optim.learning_rate"):
        _positive(f"stage.{key}", OmegaConf.select(stage, key))
    sampling, optim = stage.sampling, stage.optim
    _check(optim.mini_batch_size <= stage.batch_size,
           f"stage.optim.mini_batch_size={optim.mini_batch_size} is larger than stage.batch_size={stage.batch_size}; "
           "lower it or raise the batch size")
    # A remainder would make the last mini-batch of every epoch smaller, weighting its samples more.
    _check(stage.batch_size % optim.mini_batch_size == 0,
           f"stage.batch_size={stage.batch_size} is not divisible by stage.optim.mini_batch_size="
           f"{optim.mini_batch_size}; use a divisor such as stage.optim.mini_batch_size="
           f"{_divisor_near(stage.batch_size, optim.mini_batch_size)}")
    _check(optim.mini_batch_size % optim.gradient_accumulation_steps == 0,
           f"stage.optim.mini_batch_size={optim.mini_batch_size} is not divisible by "
           f"stage.optim.gradient_accumulation_steps={optim.gradient_accumulation_steps}")
    _check(0 < sampling.top_p <= 1, f"stage.sampling.top_p={sampling.top_p!r} must be in (0, 1]")
    _check(sampling.top_k >= 0, f"stage.sampling.top_k={sampling.top_k!r} must be >= 0 (0 turns it off)")
    _check(0 <= sampling.min_new_tokens <= sampling.max_new_tokens,
           f"stage.sampling.min_new_tokens={sampling.min_new_tokens} must be in [0, stage.sampling.max_new_tokens="
           f"{sampling.max_new_tokens}]")
    _one_of("stage.sharing", stage.sharing, ("shared", "separate"))
    _one_of("stage.optim.optimizer", optim.optimizer, ("adamw", "adamw_8bit"))
    _one_of("stage.optim.lr_scheduler", optim.lr_scheduler, ("constant", "linear", "cosine"))
    policies = list(stage.policies)
    _check(len(policies) > 0 and len(set(policies)) == len(policies) and all(policies),
           f"stage.policies={policies} must be a non-empty list of distinct names")
    _check(not any(p.endswith("_critic") or p in ("reward", "__base__") for p in policies),
           f"stage.policies={policies}: names ending in _critic, 'reward' and '__base__' are reserved")
    _check(optim.ratio_threshold > 1, f"stage.optim.ratio_threshold={optim.ratio_threshold!r} must be > 1")
    if stage.resume not in (None, "auto"):
        _check(os.path.isdir(stage.resume), f"stage.resume={stage.resume!r} does not exist; "
               "give a checkpoints/step-* dir or use stage.resume=auto")


def _validate_critic_free(stage: DictConfig) -> None:
    _positive("stage.optim.num_iterations", stage.optim.num_iterations)
    _one_of("stage.advantage_estimator", stage.advantage_estimator, ADVANTAGE_ESTIMATORS)
    group = stage.sampling.num_generations
    _check(group >= 2, f"stage.sampling.num_generations={group} must be >= 2; a group needs two responses to "
           "compare (TRL's default is 8)")
    _check(stage.batch_size % group == 0,
           f"stage.batch_size={stage.batch_size} is not divisible by stage.sampling.num_generations={group}; "
           f"use a multiple of it, e.g. stage.batch_size={group * max(1, stage.batch_size // group)}")
    kl, loss, adv = stage.kl, stage.loss, stage.advantages
    _check(kl.beta >= 0, f"stage.kl.beta={kl.beta!r} must be >= 0; 0 turns the KL term off")
    _check(0 <= loss.epsilon < 1, f"stage.loss.epsilon={loss.epsilon!r} must be in [0, 1); 0.2 is usual")
    _check(loss.epsilon_high is None or loss.epsilon_high >= 0,
           f"stage.loss.epsilon_high={loss.epsilon_high!r} must be >= 0 or null (= stage.loss.epsilon); DAPO uses 0.28")
    _one_of("stage.loss.loss_type", loss.loss_type, LOSS_TYPES)
    if loss.loss_type == "rloo":
        _check(stage.advantage_estimator != "reinforce_pp", "stage.loss.loss_type=rloo needs one advantage per "
               "response (grpo, rloo); reinforce_pp's vary by token: use a token-level loss_type, e.g. dapo")
        _check(kl.kl_in_reward or kl.beta == 0, "stage.loss.loss_type=rloo has no KL loss term (TRL's RLOO puts "
               "the KL in the reward): set stage.kl.kl_in_reward=true or stage.kl.beta=0, or use loss_type=dapo")
    _one_of("stage.advantages.scale_rewards", adv.scale_rewards, SCALE_REWARDS)
    _one_of("stage.kl.kl_estimator", kl.kl_estimator, ("k1", "k3"))
    _check(0 <= adv.gamma <= 1, f"stage.advantages.gamma={adv.gamma!r} must be in [0, 1]")
    _validate_shared_rl(stage)


def _validate_rewards(stage: DictConfig) -> None:
    """``stage.rewards``: each source an adapter or a function that imports, finite weights, not all 0."""
    sources = reward_sources(stage)
    for source in sources:
        key = f"stage.rewards.{source.name}"
        _check(SOURCE_NAME.fullmatch(source.name) is not None,
               f"{key}: the name {source.name!r} may only hold letters, digits, '_' and '-' (it is part of metric "
               "names); rename the source")
        _check(math.isfinite(source.weight), f"{key}.weight={source.weight!r} must be a finite number")
        _check(source.adapter is None or source.function is None,
               f"{key} has both adapter={source.adapter!r} and function={source.function!r}; a source is one of "
               "them: make two sources")
        if source.function is not None:
            _check(source.label_index is None, f"{key}.label_index={source.label_index!r} is for reward adapters; "
                   "drop it from this function source")
            load_reward_function(f"{key}.function", source.function)
        elif source.label_index is not None:
            _check(source.label_index >= 0, f"{key}.label_index={source.label_index!r} must be >= 0")
        if source.adapter and looks_local(source.adapter):
            _check(os.path.isdir(os.path.expanduser(source.adapter)),
                   f"{key}.adapter={source.adapter!r} does not exist; give an existing reward adapter dir or hub id")
    _check(any(source.weight != 0 for source in sources),
           "every weight in stage.rewards is 0, so the reward is always 0; give one source a weight")
    if not any(source.upstream for source in sources):
        for key in ("reward_adapter", "reward_label_index"):
            _check(stage.get(key) is None, f"stage.{key}={stage.get(key)!r} is not used: no source in stage.rewards "
                   "reads the upstream reward adapter; drop it, or add a source without adapter and function")
    adapters = [source for source in sources if source.function is None]
    _check(stage.sharing == "shared" or len(adapters) <= 1,
           f"stage.sharing=separate scores with one reward adapter, but stage.rewards has {len(adapters)} "
           f"({', '.join(s.name for s in adapters)}); use stage.sharing=shared")
    taken = set(reward_adapter_names(sources).values()) & set(stage.policies)
    _check(not taken, f"stage.policies={list(stage.policies)}: {', '.join(sorted(taken))} is the name of a reward "
           "adapter of stage.rewards; rename the policy")


def _divisor_near(total: int, wanted: int) -> int:
    """The divisor of ``total`` closest to ``wanted`` (the smaller one on a tie)."""
    return min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: (abs(d - wanted), d))


def _validate_chat(data: DictConfig) -> None:
    if data.get("chat_template"):
        resolve_template(data.chat_template)  # a ConfigError naming the key when neither file nor name
    if data.get("conversational"):
        _check(data.name == "hh_rlhf", f"data.conversational=true is for data=hh_rlhf (data.name={data.name!r}); "
               "local files are conversational when their columns hold message lists")


def sft_finetune_mode(cfg: DictConfig) -> str:
    """``stage.finetune`` with ``auto`` resolved: quantized weights can only be trained through LoRA."""
    if cfg.stage.finetune != "auto":
        return cfg.stage.finetune
    return "lora" if cfg.quant.mode in ("8bit", "4bit") else "full"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{key}={value!r} is not valid; use one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, fix: str = "") -> None:
    _check(value > 0, f"{key}={value!r} must be > 0{'; ' + fix if fix else ''}")

