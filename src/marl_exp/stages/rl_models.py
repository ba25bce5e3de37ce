"""The models of an RL stage: the multi-adapter model with every policy (and critic) adapter and every
reward adapter of ``stage.rewards``, in the stage's sharing mode (``stage.sharing``), and its trainer."""

from __future__ import annotations

import torch
from peft import PeftModel

from marl_exp.config import reward_sources
from marl_exp.modeling.loading import load_model, load_tokenizer
from marl_exp.modeling.multi_adapter import (
    MultiAdapterModel,
    check_label_index,
    disable_dropout,
    reward_adapter_pad_token_id,
    reward_head_labels,
)
from marl_exp.provenance import check_same_base
from marl_exp.rl.reward_sources import RewardSources
from marl_exp.rl.roles import SeparateRoles, SharedRoles, critic_name
from marl_exp.rl.rollout import PerfOptions
from marl_exp.rl.trainer import RLTrainer
from marl_exp.stages.common import policy_lora_config


def build_roles(cfg, sft_model: str, reward_adapter: str | None, device: torch.device, tokenizer=None):
    """The multi-adapter model with every policy (and critic) adapter and every reward adapter of
    ``stage.rewards``, wrapped in its sharing mode. ``reward_adapter``: the upstream reward adapter (the
    sources without adapter and function), None when no source reads it."""
    stage = cfg.stage
    sources = RewardSources(reward_sources(stage))
    adapters = {s.name: (s.adapter or reward_adapter, s.label_index) for s in sources.sources if s.function is None}
    missing = [name for name, (path, _) in adapters.items() if path is None]
    if missing:
        raise ValueError(f"reward source(s) {', '.join(missing)} read the upstream reward adapter, but none was given")
    primary_path, primary_label = adapters.get(sources.primary, (None, None))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(sft_model, cfg.model)
    torch.manual_seed(cfg.seed)  # LoRA and value-head init
    base = load_model(sft_model, cfg.model, cfg.quant, device)
    lora = policy_lora_config(cfg, base)
    shared = stage.sharing == "shared"
    model = MultiAdapterModel.build(
        base, policy_config=lora, policy_name=stage.policies[0],
        reward_adapter=primary_path if shared else None, reward_label_index=primary_label,
        base_path=sft_model, allow_base_mismatch=stage.allow_base_mismatch,
        gradient_checkpointing=stage.runtime.gradient_checkpointing, reward_pad_token_id=_reward_pad(primary_path, tokenizer))
    for name in stage.policies[1:]:
        model.add_policy(name, lora)
    if critic_of(stage) == "adapter":
        for name in stage.policies:
            model.add_policy(critic_name(name), lora)
    for name, adapter_name in sources.extra_adapters.items():  # after the policies: their init stays as it was
        path, label = adapters[name]
        model.add_reward_adapter(adapter_name, path, label, _reward_pad(path, tokenizer), base_path=sft_model,
                                 allow_base_mismatch=stage.allow_base_mismatch)
    model.activate_policy(stage.policies[0])
    if stage.runtime.disable_dropout:
        disable_dropout(model)
    if shared:
        return SharedRoles(model, sources)
    reference = load_model(sft_model, cfg.model, cfg.quant, device)
    # sharing=separate scores with one reward adapter at most (config.validate), in its own classifier.
    reward = None if primary_path is None else _reward_classifier(cfg, sft_model, primary_path, primary_label, device,
                                                                  tokenizer, model)
    return SeparateRoles(model, reference, reward, sources)


def _reward_classifier(cfg, sft_model: str, adapter: str, label_index: int | None, device, tokenizer,
                       model: MultiAdapterModel) -> PeftModel:
    """``stage.sharing=separate``: the reward adapter on its own copy of the base, as a sequence classifier."""
    check_same_base(adapter, sft_model, cfg.stage.allow_base_mismatch)
    num_labels = reward_head_labels(adapter)
    model.reward_label_index = check_label_index(label_index or 0, num_labels)
    classifier = load_model(sft_model, cfg.model, cfg.quant, device, task="seq-cls", num_labels=num_labels)
    classifier.config.get_text_config().pad_token_id = _reward_pad(adapter, tokenizer)  # as in its training
    return PeftModel.from_pretrained(classifier, adapter, adapter_name="reward")


def _reward_pad(adapter: str | None, tokenizer) -> int | None:
    """The pad id a reward adapter pooled by in training: its own saved tokenizer's, else this one's (the
    reward stage loads the same SFT tokenizer, with pad = EOS when it has no pad token)."""
    pad = reward_adapter_pad_token_id(adapter) if adapter is not None else None
    return tokenizer.pad_token_id if pad is None else pad


def critic_of(stage) -> str:
    """The PPO stage's critic (value_head | adapter); ``none`` for the critic-free stages."""
    return stage.critic if stage.name == "ppo" else "none"


def make_trainer(stage, roles, tokenizer, prompts: list[str], seed: int) -> RLTrainer:
    """The RL loop with the stage's algorithm (``stage.name``)."""
    return RLTrainer(roles, tokenizer, stage, prompts, seed=seed, perf=PerfOptions(fused_scoring=stage.runtime.fused_scoring))
