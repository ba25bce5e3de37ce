"""Rollouts: sample responses from a policy adapter, then score them on the same base.

Layout of every sequence in a batch, Q = padded prompt length, R = padded response length::

    [ pad … pad | prompt tokens ][ response tokens … EOS | pad … pad ]
      left-padded query (Q)        right-padded response (R)

Response tokens after the first EOS are replaced by padding and masked out everywhere.
The logits at position ``Q-1+t`` predict response token ``t``, so response log-probs and values
are read from positions ``Q-1 … Q+R-2``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from marl_exp.ppo.core import kl_per_token, logprobs_from_logits


@dataclass
class Rollout:
    query_ids: torch.Tensor  # [B, Q] left-padded
    query_mask: torch.Tensor  # [B, Q]
    response_ids: torch.Tensor  # [B, R] right-padded after EOS
    response_mask: torch.Tensor  # [B, R] 1 on real response tokens (EOS included)
    logprobs: torch.Tensor | None = None  # [B, R] policy (old) log-probs, temperature-scaled
    ref_logprobs: torch.Tensor | None = None  # [B, R] reference log-probs, same scaling
    values: torch.Tensor | None = None  # [B, R] critic values before each response token
    kl: torch.Tensor | None = None  # [B, R] per-token KL penalty
    scores: torch.Tensor | None = None  # [B] reward-model scores (after scaling/penalties)
    raw_scores: torch.Tensor | None = None  # [B] reward-model scores as returned
    has_eos: torch.Tensor | None = None  # [B] bool

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows ``index`` of every tensor (a mini-batch)."""
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in fields(self)})


def response_slice(query_len: int, response_len: int) -> slice:
    """Positions whose outputs predict the response tokens (and hold their values)."""
    return slice(query_len - 1, query_len + response_len - 1)


def truncate_after_eos(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int):
    """Keep each response up to and including its first EOS; returns (ids, mask, has_eos)."""
    is_eos = response_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long))
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_eos


def sample(model, tokenizer, prompts: list[str], adapter: str, cfg) -> Rollout:
    """Sample one response per prompt from policy ``adapter`` (KV cache, left padding)."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(
        enc.input_ids, enc.attention_mask, adapter=adapter,
        do_sample=True, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    response = out[:, enc.input_ids.shape[1]:]
    response_ids, response_mask, has_eos = truncate_after_eos(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return Rollout(enc.input_ids, enc.attention_mask, response_ids, response_mask, has_eos=has_eos)


def pad_response(rollout: Rollout, length: int, pad_token_id: int) -> None:
    """Right-pad the response to ``length`` tokens (masked), so rollouts can share one batch."""
    extra = length - rollout.response_ids.shape[1]
    if extra > 0:
        rollout.response_ids = torch.nn.functional.pad(rollout.response_ids, (0, extra), value=pad_token_id)
        rollout.response_mask = torch.nn.functional.pad(rollout.response_mask, (0, extra), value=0)


@torch.no_grad()
def score(roles, rollout: Rollout, adapter: str, critic: str, cfg) -> Rollout:
    """Fill in old log-probs, values, reference log-probs, per-token KL and scores of one rollout."""
    return score_many(roles, {adapter: rollout}, critic, cfg, pad_token_id=0)[adapter]  # one: nothing to pad


@torch.no_grad()
def score_many(roles, rollouts: dict[str, Rollout], critic: str, cfg, pad_token_id: int) -> dict[str, Rollout]:
    """Score the rollouts of several policies on the same prompts.

    The reference and reward passes do not depend on the policy, so they run once over all
    policies' responses stacked in one batch; each policy then gets its own log-probs and values.
    """
    length = max(r.response_ids.shape[1] for r in rollouts.values())
    for rollout in rollouts.values():
        pad_response(rollout, length, pad_token_id)
    ids = torch.cat([r.input_ids for r in rollouts.values()])
    mask = torch.cat([r.attention_mask for r in rollouts.values()])
    window = response_slice(ids.shape[1] - length, length)
    ref_logits = (roles.reference_logits(ids, mask)[:, window].float() / cfg.temperature).split(
        [r.query_ids.shape[0] for r in rollouts.values()])
    raw_scores = roles.reward_scores(ids, mask, next(iter(rollouts))).float().split(
        [r.query_ids.shape[0] for r in rollouts.values()])

    for (adapter, rollout), ref, raw in zip(rollouts.items(), ref_logits, raw_scores):
        policy = roles.policy_outputs(rollout.input_ids, rollout.attention_mask, adapter, critic)
        logits = policy.logits[:, window].float() / cfg.temperature
        rollout.logprobs = logprobs_from_logits(logits, rollout.response_ids)
        rollout.ref_logprobs = logprobs_from_logits(ref, rollout.response_ids)
        rollout.values = policy.values[:, window].float()
        rollout.kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl_penalty, cfg.kl_estimator,
                                  logits=logits, ref_logits=ref)
        rollout.raw_scores = raw
    return rollouts
