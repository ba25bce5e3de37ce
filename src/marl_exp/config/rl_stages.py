"""Schemas of the RL stages (PPO, GRPO, RLOO, REINFORCE++) and the critic-free stages' choices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING

from marl_exp.config.reward_sources import RewardSourceConfig

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
    # Small enough that LoRA on the output layer (adapter.output_layer) does not overshoot (docs/results.md).
    learning_rate: float = 3e-4
    # Linear decay to 0 over stage.steps (CleanRL's anneal_lr): late single updates at a constant rate can throw
    # a converged policy off (docs/results.md).
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
    # (tested); off where it is not faster (on a CPU: docs/performance.md).
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
    # Empty = one source "reward": the upstream reward adapter above, weight 1. Presets: +rewards=<conf/rewards>;
    # one source on the command line: stage.rewards.<name>.function=mod:fn stage.rewards.<name>.weight=0.5.
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


# The critic-free stages' choices (the rl package's registry and losses implement exactly these).
ADVANTAGE_ESTIMATORS = ("grpo", "reinforce_pp", "rloo")  # stage.advantage_estimator
SCALE_REWARDS = ("group", "batch", "none")  # stage.advantages.scale_rewards (grpo)
TOKEN_LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")  # per-token surrogates, aggregated as TRL's GRPOTrainer
LOSS_TYPES = TOKEN_LOSS_TYPES + ("rloo",)  # stage.loss.loss_type; rloo: TRL's RLOOTrainer sequence-level loss


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
    ``advantage_estimator`` (``marl_exp.rl.algorithms.groups``) and runs ``optim.num_iterations`` clipped updates of the
    policy adapter per batch. Names follow TRL 1.x's ``GRPOConfig`` / ``RLOOConfig``.
    """

    advantage_estimator: str = MISSING  # one of ADVANTAGE_ESTIMATORS
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
    # DeepSeekMath's β, not TRL's 0: without a KL term GRPO drifts away from the reference on the built-in task.
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

