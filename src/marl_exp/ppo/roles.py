"""Where the three RLHF roles come from: one shared base (``shared``) or separate instances (``separate``).

Both give the PPO loop the same three calls, so the loop cannot tell them apart; ``separate`` is the
baseline that shows sharing the base changes memory, not results.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from marl_exp.modeling.multi_adapter import MultiAdapterModel, PolicyOutput, last_token_index, position_ids_from_mask


def critic_name(policy: str) -> str:
    return f"{policy}_critic"


class SharedRoles:
    """Policy, reference and reward all on one ``MultiAdapterModel``."""

    def __init__(self, model: MultiAdapterModel):
        self.model = model

    def policy_outputs(self, input_ids, attention_mask, policy: str, critic: str) -> PolicyOutput:
        """Policy logits, and values from the policy's value head or its own critic adapter."""
        out = self.model.policy_forward(input_ids, attention_mask, adapter=policy)
        if critic == "adapter":
            values = self.model.policy_forward(input_ids, attention_mask, adapter=critic_name(policy)).values
            self.model.activate_policy(policy)
            out = PolicyOutput(out.logits, values, out.hidden_states)
        return out

    def reference_logits(self, input_ids, attention_mask) -> torch.Tensor:
        return self.model.reference_logits(input_ids, attention_mask)

    def reward_scores(self, input_ids, attention_mask, policy: str) -> torch.Tensor:
        return self.model.compute_reward_score(input_ids, attention_mask, ppo_adapter_name=policy)


class SeparateRoles(SharedRoles):
    """Baseline: the reference is its own copy of the base, the reward its own classifier + adapter."""

    def __init__(self, model: MultiAdapterModel, reference_model, reward_model: PeftModel):
        super().__init__(model)
        self.reference_model = reference_model.eval().requires_grad_(False)
        self.reward_model = reward_model.eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask) -> torch.Tensor:
        return self.reference_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask, policy: str) -> torch.Tensor:
        # Pool at the last real token by the mask (HF's classifier pools by pad id, wrong when pad == EOS).
        classifier = self.reward_model.get_base_model()
        backbone = getattr(classifier, classifier.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        head = classifier.score
        return head(last.to(next(head.parameters()).dtype))[:, self.model.reward_label_index]
