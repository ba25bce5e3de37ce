"""TRL-0.11-compatible entry point: ``AutoModelForCausalLMWithValueHead.from_pretrained(...)``.

Code written for TRL's multi-adapter docs runs unchanged::

    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, peft_config=lora_config, reward_adapter=rm_adapter_id, load_in_8bit=True)
    rewards = model.compute_reward_score(**inputs)
    rewards = model.compute_reward_score(**inputs, ppo_adapter_name="policy_1")

Differences, all deliberate: scores come back one per sequence (at the last real token, not the
last position), ``ppo_adapter_name`` works, and a reward adapter trained on another base is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from marl_exp.modeling.multi_adapter import MultiAdapterModel

DEFAULT_POLICY_NAME = "default"  # what TRL named the policy adapter


class AutoModelForCausalLMWithValueHead(MultiAdapterModel):
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, peft_config=None,
                        reward_adapter: str | None = None, reward_adapter_name: str = "reward_adapter",
                        reward_label_index: int | None = None, load_in_8bit: bool = False,
                        load_in_4bit: bool = False, allow_base_mismatch: bool = False,
                        gradient_checkpointing: bool = False, **kwargs) -> "AutoModelForCausalLMWithValueHead":
        source = pretrained_model_name_or_path
        if load_in_8bit and load_in_4bit:
            raise ValueError("load_in_8bit=True and load_in_4bit=True were both given; choose one")
        if load_in_8bit or load_in_4bit:
            if "quantization_config" in kwargs:
                raise ValueError("give either load_in_8bit/load_in_4bit or quantization_config, not both")
            # transformers 5 dropped the load_in_*bit keywords; this is what they used to mean.
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
        if "quantization_config" in kwargs:
            kwargs.setdefault("device_map", {"": "cuda" if torch.cuda.is_available() else "cpu"})

        common = dict(reward_adapter=reward_adapter, reward_adapter_name=reward_adapter_name,
                      reward_label_index=reward_label_index, allow_base_mismatch=allow_base_mismatch,
                      gradient_checkpointing=gradient_checkpointing, policy_name=DEFAULT_POLICY_NAME)
        if isinstance(source, (PeftModel, PreTrainedModel)):
            base_path = getattr(source.config, "name_or_path", None) if not isinstance(source, PeftModel) \
                else source.get_base_model().config.name_or_path
            if isinstance(source, PreTrainedModel) and peft_config is None:
                raise ValueError(_NEEDS_PEFT)
            return cls.build(source, policy_config=peft_config, base_path=base_path, **common)

        if _is_adapter_dir(source):  # a trained policy adapter: load its base, then the adapter
            base_path = PeftConfig.from_pretrained(source).base_model_name_or_path
            if not base_path:
                raise ValueError(f"the policy adapter in {str(source)!r} does not name its base model "
                                 "(base_model_name_or_path in adapter_config.json); load the base yourself and "
                                 "pass it with peft_config, or fix the adapter config")
            base = AutoModelForCausalLM.from_pretrained(base_path, *model_args, **kwargs)
            return cls.build(base, policy_adapter=str(source), base_path=base_path, **common)

        if peft_config is None:
            raise ValueError(_NEEDS_PEFT)
        base = AutoModelForCausalLM.from_pretrained(source, *model_args, **kwargs)
        return cls.build(base, policy_config=peft_config, base_path=str(source), **common)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """TRL's tuple: (lm_logits, loss=None, value)."""
        out = self.policy_forward(input_ids, attention_mask)
        return out.logits, None, out.values

    @property
    def v_head(self):
        return self.value_heads[self.active_policy]

    @property
    def pretrained_model(self) -> PeftModel:
        return self.peft_model


_NEEDS_PEFT = ("marl-exp's value-head model is adapter-based: pass peft_config=LoraConfig(task_type='CAUSAL_LM', ...) "
               "or a path/PeftModel that already holds a policy adapter")


def _is_adapter_dir(source) -> bool:
    return isinstance(source, (str, Path)) and (Path(source) / "adapter_config.json").exists()
