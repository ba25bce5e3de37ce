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


@torch.no_grad()
def score(roles, rollout: Rollout, adapter: str, critic: str, cfg) -> Rollout:
    """Fill in old log-probs, values, reference log-probs, per-token KL and scores."""
    ids, mask = rollout.input_ids, rollout.attention_mask
    window = response_slice(rollout.query_ids.shape[1], rollout.response_ids.shape[1])
    policy = roles.policy_outputs(ids, mask, adapter, critic)
    logits = policy.logits[:, window].float() / cfg.temperature
    ref_logits = roles.reference_logits(ids, mask)[:, window].float() / cfg.temperature
    rollout.logprobs = logprobs_from_logits(logits, rollout.response_ids)
    rollout.ref_logprobs = logprobs_from_logits(ref_logits, rollout.response_ids)
    rollout.values = policy.values[:, window].float()
    rollout.kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, cfg.kl_penalty, cfg.kl_estimator,
                              logits=logits, ref_logits=ref_logits)
    rollout.raw_scores = roles.reward_scores(ids, mask, adapter).float()
    return rollout
