"""Where the three RLHF roles come from: one shared base (``shared``) or separate instances (``separate``).

Both give the RL loop the same calls, so the loop cannot tell them apart; ``separate`` is the
baseline that shows sharing the base changes memory, not results. ``reward_sources`` says what the
reward is made of (``reward_sources.RewardSources``; default: the one reward adapter).
"""

from __future__ import annotations

import torch
from peft import PeftModel

from marl_exp.modeling.multi_adapter import (
    MultiAdapterModel,
    PolicyOutput,
    RoleScores,
    causal_lm_logits,
    position_ids_from_mask,
)
from marl_exp.rl.reward_sources import RewardSources


def critic_name(policy: str) -> str:
    return f"{policy}_critic"


class SharedRoles:
    """Policy, reference and reward all on one ``MultiAdapterModel``."""

    def __init__(self, model: MultiAdapterModel, reward_sources: RewardSources | None = None):
        self.model = model
        self.reward_sources = reward_sources or RewardSources.default()

    def policy_outputs(self, input_ids, attention_mask, policy: str, critic: str,
                       logits_positions: slice | None = None) -> PolicyOutput:
        """Policy logits, and values from the policy's value head or its own critic adapter."""
        out = self.model.policy_forward(input_ids, attention_mask, adapter=policy, logits_positions=logits_positions)
        if critic == "adapter":
            values = self.model.policy_forward(input_ids, attention_mask, adapter=critic_name(policy),
                                               logits_positions=slice(0, 0)).values
            self.model.activate_policy(policy)
            out = PolicyOutput(out.logits, values, out.hidden_states)
        return out

    def reference_logits(self, input_ids, attention_mask, logits_positions: slice | None = None) -> torch.Tensor:
        return self.model.reference_logits(input_ids, attention_mask, logits_positions=logits_positions)

    def reward_scores(self, input_ids, attention_mask, policy: str, adapter: str | None = None) -> torch.Tensor:
        """Scores of reward adapter ``adapter`` (default: the first one)."""
        return self.model.compute_reward_score(input_ids, attention_mask, ppo_adapter_name=policy,
                                               reward_adapter_name=adapter)

    def score(self, input_ids, attention_mask, row_policies: list[str], critic: str, logits_positions: slice,
              fused: bool = True, reward_input_ids=None, reward_attention_mask=None, reward: bool = True,
              policy: bool = True) -> RoleScores:
        """Everything scoring needs for rows grouped by policy (``row_policies[i]`` sampled row ``i``).

        ``fused``: one mixed-adapter forward for every role (``MultiAdapterModel.score_roles``);
        otherwise one pass per role, as ``SeparateRoles`` must do. The reward reads ``reward_input_ids``
        (the text as the reward trainer saw it, see ``rollout.reward_inputs``) when given; ``reward=False``:
        no reward adapter pass (``reward_scores`` is None), for a reward from other sources; ``policy=False``:
        no policy pass (``policy_logits`` and ``values`` are None), when the update's first forward gives them.
        """
        reward_ids = input_ids if reward_input_ids is None else reward_input_ids
        reward_mask = attention_mask if reward_attention_mask is None else reward_attention_mask
        if not fused or not policy:  # without policy rows, the fused pass would only join reference and reward
            return score_role_by_role(self, input_ids, attention_mask, row_policies, critic, logits_positions,
                                      reward_ids, reward_mask, reward, policy)
        critics = [critic_name(p) for p in row_policies] if critic == "adapter" else None
        return self.model.score_roles(input_ids, attention_mask, row_policies, critics, logits_positions,
                                      reward_ids, reward_mask, reward=reward)


class SeparateRoles(SharedRoles):
    """Baseline: the reference is its own copy of the base, the reward its own classifier + adapter."""

    def __init__(self, model: MultiAdapterModel, reference_model, reward_model: PeftModel | None,
                 reward_sources: RewardSources | None = None):
        super().__init__(model, reward_sources)
        self.reference_model = reference_model.eval().requires_grad_(False)
        # None when no source is a reward adapter; one at most (config.validate: sharing=separate).
        self.reward_model = reward_model.eval().requires_grad_(False) if reward_model is not None else None

    @torch.no_grad()
    def reference_logits(self, input_ids, attention_mask, logits_positions: slice | None = None) -> torch.Tensor:
        backbone = getattr(self.reference_model, self.reference_model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return causal_lm_logits(self.reference_model, hidden, logits_positions)

    @torch.no_grad()
    def reward_scores(self, input_ids, attention_mask, policy: str, adapter: str | None = None) -> torch.Tensor:
        # The classifier's own forward (it pools by pad id, as when it was trained); positions from the mask,
        # so left padding reads what right padding would.
        logits = self.reward_model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids_from_mask(attention_mask)).logits
        return logits[:, self.model.reward_label_index].float()

    def score(self, input_ids, attention_mask, row_policies: list[str], critic: str, logits_positions: slice,
              fused: bool = True, reward_input_ids=None, reward_attention_mask=None, reward: bool = True,
              policy: bool = True) -> RoleScores:
        # Separate models cannot share a forward: always one pass per role.
        return super().score(input_ids, attention_mask, row_policies, critic, logits_positions, fused=False,
                             reward_input_ids=reward_input_ids, reward_attention_mask=reward_attention_mask,
                             reward=reward, policy=policy)


def score_role_by_role(roles: SharedRoles, input_ids, attention_mask, row_policies: list[str], critic: str,
                       logits_positions: slice, reward_input_ids, reward_attention_mask, reward: bool = True,
                       policy: bool = True) -> RoleScores:
    """One reference and one reward pass over all rows, then (``policy``) one policy pass per block of rows of a
    policy. All in eval mode, as the fused pass: the old log-probs and values are those of the policy that sampled
    the responses (``generate`` runs in eval mode), whatever mode the update trains in."""
    reference = roles.reference_logits(input_ids, attention_mask, logits_positions)
    rewards = roles.reward_scores(reward_input_ids, reward_attention_mask, row_policies[0]) if reward else None
    if not policy:
        return RoleScores(None, None, reference, rewards)
    positions = slice(None) if logits_positions is None else logits_positions
    logits, values = [], []
    with roles.model._eval_mode():
        for name, rows in _blocks(row_policies):
            out = roles.policy_outputs(input_ids[rows], attention_mask[rows], name, critic, logits_positions)
            logits.append(out.logits)
            values.append(out.values[:, positions].float())
    return RoleScores(torch.cat(logits), torch.cat(values), reference, rewards)


def _blocks(row_policies: list[str]) -> list[tuple[str, slice]]:
    """Consecutive runs of the same policy: [("a", slice(0, 4)), ("b", slice(4, 8))]."""
    blocks, start = [], 0
    for i in range(1, len(row_policies) + 1):
        if i == len(row_policies) or row_policies[i] != row_policies[start]:
            blocks.append((row_policies[start], slice(start, i)))
            start = i
    return blocks
