"""Rollouts: sample responses from a policy adapter, then score them on the same base.

Layout of every sequence in a batch, Q = padded prompt length, R = padded response length::

    [ pad … pad | prompt tokens ][ response tokens … EOS | pad … pad ]
      left-padded query (Q)        right-padded response (R)

Response tokens after the first EOS are replaced by padding and masked out everywhere.
The logits at position ``Q-1+t`` predict response token ``t``, so response log-probs and values
are read from positions ``Q-1 … Q+R-2``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig

from marl_exp.data import chat
from marl_exp.rl.functional import kl_per_token, logprobs_from_logits
from marl_exp.rl.reward_sources import RewardSources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerfOptions:
    """Speed-ups of the RL loop. Each keeps results equal (tests/test_perf_equivalence.py); flipping one
    is only for measuring what it buys (``python bench/speed.py --ablation``, docs/performance.md)."""

    inference_mode: bool = True  # rollout and scoring under torch.inference_mode rather than no_grad
    window_logits: bool = True  # the LM head only at the positions that predict response tokens
    lazy_entropy: bool = True  # entropy without autograd, a few rows at a time, when entropy_coef is 0 (only logged)
    lean_logprobs: bool = True  # the update's backward turns the response logits into their own gradient (in place)
    shared_prefill: bool = True  # a group's prompt (GRPO's num_generations rows) through the model once, not per row
    # The old log-probs from the first update's forward, not a scoring pass, where that forward runs the sampling
    # weights and nothing reads them before it (GRPO's KL in the loss, one mini-batch a step: RLTrainer).
    old_logprobs_from_update: bool = True
    # Policy, reference and reward rows in one mixed-adapter forward (shared base only). Off: on a CPU
    # peft's per-row adapter dispatch costs more than the two passes it saves (docs/performance.md).
    fused_scoring: bool = False


DEFAULT_PERF = PerfOptions()


def no_grad_mode(inference: bool):
    """inference_mode also skips autograd's version counters and view tracking; its tensors must be
    cloned (``detached``) before autograd may see them."""
    return torch.inference_mode() if inference else torch.no_grad()


def detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A normal tensor usable by autograd later (inference tensors are not), without copying otherwise."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


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
    raw_scores: torch.Tensor | None = None  # [B] the reward: Σ weight × score over the reward sources
    source_scores: dict[str, torch.Tensor] | None = None  # each reward source's scores [B], unweighted
    has_eos: torch.Tensor | None = None  # [B] bool
    advantages: torch.Tensor | None = None  # [B, R] the update's targets (phase 4 of RLTrainer.step)
    returns: torch.Tensor | None = None  # [B, R] the critic's targets (PPO only)
    conversations: list | None = None  # [B] the prompts as message lists (conversational tasks), else None
    prompts: list | None = None  # [B] the prompts as given to ``sample`` (what reward functions read)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)

    def select(self, index: torch.Tensor) -> "Rollout":
        """Rows ``index`` of every tensor (a mini-batch)."""
        def rows(value):
            if isinstance(value, list):
                return [value[i] for i in torch.as_tensor(index).reshape(-1).tolist()]
            if isinstance(value, dict):
                return {key: rows(item) for key, item in value.items()}
            return None if value is None else value[index]

        return Rollout(**{f.name: rows(getattr(self, f.name)) for f in fields(self)})


@dataclass
class PolicyForward:
    """A policy's forward over a mini-batch, with gradients: what the update's losses read."""

    logprobs: torch.Tensor  # [B, R] log-probs of the response tokens (float32, temperature-scaled)
    logits: torch.Tensor  # [B, R, vocab] the temperature-scaled logits that predict them
    values: torch.Tensor  # [B, Q + R] the policy's value head at every position
    window: slice  # the positions (of ``values``) that predict the response tokens


def response_slice(query_len: int, response_len: int) -> slice:
    """Positions whose outputs predict the response tokens (and hold their values)."""
    return slice(query_len - 1, query_len + response_len - 1)


def stop_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and every EOS id of the model's generation
    config and config (Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``), the tokenizer's first."""
    found = [tokenizer.eos_token_id]
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(config, "eos_token_id", None) if config is not None else None
        found += value if isinstance(value, (list, tuple)) else [value]
    return list(dict.fromkeys(i for i in found if i is not None))


def truncate_after_eos(response_ids: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int):
    """Keep each response up to and including its first stop token (any of ``eos_token_id``);
    returns (ids, mask, has_eos)."""
    stops = torch.as_tensor(eos_token_id, device=response_ids.device).reshape(-1)
    is_eos = torch.isin(response_ids, stops)
    has_eos = is_eos.any(dim=1)
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, response_ids.shape[1], dtype=torch.long))
    mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_token_id))
    return ids, mask, has_eos


def sampling_config(stage, stop_ids: list[int], pad_token_id: int) -> GenerationConfig:
    """The sampling settings PPO's log-probs assume, built here and nowhere else: plain multinomial
    sampling from softmax(logits / temperature). Nothing comes from the model's ``generation_config``
    (``MultiAdapterModel.generate`` blanks it); top-k, top-p and ``min_new_tokens`` are the only
    changes to that softmax, and ``warn_if_sampling_differs`` says so once."""
    return GenerationConfig(
        do_sample=True, temperature=stage.sampling.temperature, top_k=stage.sampling.top_k, top_p=stage.sampling.top_p,
        max_new_tokens=stage.sampling.max_new_tokens, min_new_tokens=stage.sampling.min_new_tokens,
        eos_token_id=list(stop_ids), pad_token_id=pad_token_id, use_cache=True,
    )


_WARNED: set[str] = set()


def warn_if_sampling_differs(stage) -> list[str]:
    """Once per process: settings under which responses are not sampled from the softmax the trainer
    scores (log-probs, ratio and KL assume the plain tempered softmax)."""
    reasons = []
    if stage.sampling.top_k:
        reasons.append(f"top_k={stage.sampling.top_k} samples only the {stage.sampling.top_k} most likely tokens")
    if stage.sampling.top_p < 1:
        reasons.append(f"top_p={stage.sampling.top_p} cuts the tail of the distribution")
    if stage.sampling.min_new_tokens:
        reasons.append(f"min_new_tokens={stage.sampling.min_new_tokens} forbids EOS for the first tokens")
    message = "; ".join(reasons)
    if reasons and message not in _WARNED:
        _WARNED.add(message)
        log.warning("sampling differs from the softmax PPO scores (%s): log-probs, ratios and KL are computed "
                    "without these filters, so the update is slightly off-policy; set stage.sampling.top_k=0, "
                    "stage.sampling.top_p=1 and stage.sampling.min_new_tokens=0 to sample exactly what is trained", message)
    return reasons


def sample(model, tokenizer, prompts: list, adapter: str, stage, perf: PerfOptions = DEFAULT_PERF,
           stop_ids: list[int] | None = None, group: int = 1) -> Rollout:
    """Sample one response per prompt from policy ``adapter`` (KV cache, left padding).

    ``prompts``: strings, or message lists rendered by the chat template with the generation prompt.
    Responses end at the first of ``stop_ids`` (default: every EOS id of the model, ``stop_token_ids``).
    ``group``: the prompts come in runs of this many repeats (the trainer's ``algorithm.group_size``); with
    ``perf.shared_prefill`` each run's prompt is computed once.
    """
    stop_ids = stop_token_ids(tokenizer, model) if stop_ids is None else stop_ids
    warn_if_sampling_differs(stage)
    # padding_side per call: the tokenizer is shared, and its own setting stays as it was.
    enc = chat.encode_prompts(tokenizer, prompts).to(model.device)
    with no_grad_mode(perf.inference_mode):
        shared = {"prompt_group": group} if perf.shared_prefill and group > 1 else {}
        out = model.generate(enc.input_ids, enc.attention_mask, adapter=adapter, **shared,
                             generation_config=sampling_config(stage, stop_ids, tokenizer.pad_token_id))
    response = detached(out[:, enc.input_ids.shape[1]:])
    response_ids, response_mask, has_eos = truncate_after_eos(response, stop_ids, tokenizer.pad_token_id)
    conversations = list(prompts) if chat.is_conversational(prompts[0]) else None
    return Rollout(enc.input_ids, enc.attention_mask, response_ids, response_mask, has_eos=has_eos,
                   conversations=conversations, prompts=list(prompts))


def reward_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                  eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences as the reward trainer saw its texts, one column wider: TRL's RewardTrainer appends
    the tokenizer's EOS to every text not ending in it, and its model learned to score there. A response
    cut at ``max_new_tokens``, or stopped by another stop id (an end-of-turn token), gets that EOS here.

    ``input_ids``/``attention_mask``: [B, Q + R], the query left-padded, the response right-padded, and
    ``response_mask`` [B, R]. Returns ids and mask [B, Q + R + 1].
    """
    rows = input_ids.shape[0]
    ids = torch.nn.functional.pad(input_ids, (0, 1), value=pad_token_id)
    mask = torch.nn.functional.pad(attention_mask, (0, 1), value=0)
    query_len = input_ids.shape[1] - response_mask.shape[1]
    end = query_len + response_mask.long().sum(1)  # one past each response's last token
    last = ids[torch.arange(rows, device=ids.device), end - 1]
    append = last != eos_token_id
    where = torch.arange(rows, device=ids.device)[append]
    ids[where, end[append]] = eos_token_id
    mask[where, end[append]] = 1
    return ids, mask


def chat_reward_inputs(tokenizer, conversations: list, response_ids: torch.Tensor, response_mask: torch.Tensor,
                       stop_ids: list[int], min_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward model's input for conversations, exactly RewardTrainer's: ``prompt + [assistant: response]``
    rendered by the chat template (``chat.reward_sequences``), so it ends in the template's end-of-turn
    tokens (``<|im_end|>\\n``), with no EOS appended. The response is its sampled tokens up to, not
    including, the stop token, decoded as generated. Right-padded to at least ``min_width`` columns (the
    fused scoring pass lays reward rows beside the policy rows); returns ids and mask.
    """
    texts = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        ids = [i for i, m in zip(ids, mask) if m]
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    rows = chat.reward_sequences(tokenizer, conversations, texts)
    width = max(min_width, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids.to(response_ids.device), mask.to(response_ids.device)


def pad_response(rollout: Rollout, length: int, pad_token_id: int) -> None:
    """Right-pad the response to ``length`` tokens (masked), so rollouts can share one batch."""
    extra = length - rollout.response_ids.shape[1]
    if extra > 0:
        rollout.response_ids = torch.nn.functional.pad(rollout.response_ids, (0, extra), value=pad_token_id)
        rollout.response_mask = torch.nn.functional.pad(rollout.response_mask, (0, extra), value=0)


def score(roles, rollout: Rollout, adapter: str, critic: str, stage, tokenizer,
          perf: PerfOptions = DEFAULT_PERF) -> Rollout:
    """Fill in old log-probs, values, reference log-probs, per-token KL and scores of one rollout."""
    return score_many(roles, {adapter: rollout}, critic, stage, tokenizer, perf=perf)[adapter]


def score_many(roles, rollouts: dict[str, Rollout], critic: str, stage, tokenizer,
               perf: PerfOptions = DEFAULT_PERF, stop_ids: list[int] | None = None,
               policy: bool = True) -> dict[str, Rollout]:
    """Score the rollouts of several policies on the same prompts.

    The reference and reward passes do not depend on the policy, so they run once over all
    policies' responses stacked in one batch; each policy gets its own log-probs and values. On a
    shared base all of it is one forward (``perf.fused_scoring``). The reward is the weighted sum of
    ``roles.reward_sources`` (``reward_sources.RewardSources``): the first reward adapter is scored with
    the other roles, each further adapter in a pass of its own, each function on the decoded texts. An
    adapter reads each sequence as the reward trainer saw its texts (``reward_inputs``,
    ``chat_reward_inputs`` for conversations); ``stop_ids``: the ids that ended the responses (default
    ``stop_token_ids``). ``policy=False`` leaves out the policy pass: old log-probs, values and KL stay None, for
    the update's first forward to fill in (``RLTrainer``, ``perf.old_logprobs_from_update``).
    """
    sources = getattr(roles, "reward_sources", None) or RewardSources.default()
    length = max(r.response_ids.shape[1] for r in rollouts.values())
    for rollout in rollouts.values():
        pad_response(rollout, length, tokenizer.pad_token_id)
    ids = torch.cat([r.input_ids for r in rollouts.values()])
    mask = torch.cat([r.attention_mask for r in rollouts.values()])
    response_mask = torch.cat([r.response_mask for r in rollouts.values()])
    responses = torch.cat([r.response_ids for r in rollouts.values()])
    conversations = [c for r in rollouts.values() for c in (r.conversations or [])]
    reward_ids = reward_mask = None
    if sources.adapter_names:  # what a reward adapter reads: the texts as its trainer saw them
        reward_ids, reward_mask = _reward_adapter_inputs(roles, tokenizer, ids, mask, responses, response_mask,
                                                         conversations, stop_ids)
    row_policies = [name for name, r in rollouts.items() for _ in range(r.query_ids.shape[0])]
    window = response_slice(ids.shape[1] - length, length)
    source_scores = {}
    with no_grad_mode(perf.inference_mode):
        out = roles.score(ids, mask, row_policies, critic, window if perf.window_logits else None,
                          fused=perf.fused_scoring, reward_input_ids=reward_ids, reward_attention_mask=reward_mask,
                          reward=sources.primary is not None, policy=policy)
        crop = slice(None) if perf.window_logits else window
        ref_logits = temperature_scaled(out.reference_logits[:, crop], stage.sampling.temperature)
        ref_logprobs = logprobs_from_logits(ref_logits, responses)
        logprobs = kl = values = None
        if policy:
            logits = temperature_scaled(out.policy_logits[:, crop], stage.sampling.temperature)
            logprobs = logprobs_from_logits(logits, responses)
            # The critic-free stages have no kl_penalty option: their KL in the reward is the plain estimate.
            kl = kl_per_token(logprobs, ref_logprobs, getattr(stage.kl, "kl_penalty", "kl"), stage.kl.kl_estimator,
                              logits=logits, ref_logits=ref_logits)
            values = out.values[:, crop].float()
        if sources.primary is not None:
            source_scores[sources.primary] = out.reward_scores.float()
        for name, adapter in sources.extra_adapters.items():  # the active policy stays active
            source_scores[name] = roles.reward_scores(reward_ids, reward_mask, roles.model.active_policy,
                                                      adapter=adapter).float()
    if sources.functions:
        source_scores.update(_function_scores(sources, rollouts, responses, tokenizer))
    source_scores = {source.name: source_scores[source.name] for source in sources.sources}
    raw_scores = sources.combine(source_scores)

    sizes = [r.query_ids.shape[0] for r in rollouts.values()]
    parts = [t.split(sizes) if t is not None else [None] * len(sizes)
             for t in (logprobs, ref_logprobs, values, kl, raw_scores)]
    per_source = {name: scores.split(sizes) for name, scores in source_scores.items()}
    for i, (rollout, (lp, ref_lp, v, k, raw)) in enumerate(zip(rollouts.values(), zip(*parts))):
        rollout.logprobs, rollout.ref_logprobs, rollout.values = detached(lp), detached(ref_lp), detached(v)
        rollout.kl, rollout.raw_scores = detached(k), detached(raw)
        rollout.source_scores = {name: detached(scores[i]) for name, scores in per_source.items()}
    return rollouts


def _reward_adapter_inputs(roles, tokenizer, ids, mask, responses, response_mask, conversations: list,
                           stop_ids: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not conversations:
        return reward_inputs(ids, mask, response_mask, tokenizer.eos_token_id, tokenizer.pad_token_id)
    stop_ids = stop_token_ids(tokenizer, roles.model) if stop_ids is None else stop_ids
    return chat_reward_inputs(tokenizer, conversations, responses, response_mask, stop_ids, min_width=ids.shape[1])


def response_texts(tokenizer, rollout: Rollout) -> list[str]:
    """The responses as text, so that a plain prompt + its response is exactly the tokenizer's decode of the
    prompt and response tokens together: what the judges, oracles and reward functions must read.

    Decoded alone, a SentencePiece (Metaspace) response loses its leading space ("the movie was" +
    "great ."), so a plain prompt's response is the text its joint decode writes after the prompt's own
    decode. A conversation's reply is decoded alone: it is the assistant message (as TRL reads completions).
    """
    if rollout.conversations is not None:
        return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    rows = zip(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask)
    return [_continuation(tokenizer, query[query_mask.bool()].tolist(), response[response_mask.bool()].tolist())
            for query, query_mask, response, response_mask in rows]


def _continuation(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> str:
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=True)
    # A decoder that rewrites the prompt's end when text follows it leaves no suffix to take: decode alone.
    return whole[len(prompt):] if whole.startswith(prompt) else tokenizer.decode(response_ids, skip_special_tokens=True)


def _function_scores(sources: RewardSources, rollouts: dict[str, Rollout], responses: torch.Tensor,
                     tokenizer) -> dict[str, torch.Tensor]:
    """Each function source's scores of the stacked responses, on the prompts and the decoded completions."""
    prompts = [p for r in rollouts.values() for p in _prompts_of(r, tokenizer)]
    completions = [text for r in rollouts.values() for text in response_texts(tokenizer, r)]
    return {name: sources.call(name, prompts, completions).to(responses.device) for name in sources.functions}


def _prompts_of(rollout: Rollout, tokenizer) -> list:
    """The prompts a rollout was sampled for (as given to ``sample``; decoded when it was built otherwise)."""
    if rollout.prompts is not None:
        return list(rollout.prompts)
    if rollout.conversations is not None:
        return list(rollout.conversations)
    return tokenizer.batch_decode(rollout.query_ids, skip_special_tokens=True)


def temperature_scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits in float32 divided by the sampling temperature (no copy at temperature 1: x / 1 == x)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature
