"""Held-out evaluation of a policy adapter: reward score (and each reward source's), KL to the reference,
length, and what the texts say (``response_metrics``: the judges' verdicts where the task has them, EOS
fraction, distinct-n).

Sampling uses its own fixed seed inside a forked RNG, so every evaluation sees the same sampling
noise (before/after comparisons use common random numbers) and training's RNG stream is untouched
(a resumed run stays identical to an uninterrupted one).
"""

from __future__ import annotations

import torch

from marl_exp.data import chat
from marl_exp.rl.functional import masked_sum
from marl_exp.data.response_metrics import judged_text, response_metrics
from marl_exp.rl.rollout import response_texts, sample, score

EVAL_SEED = 12345
# Responses of each evaluation kept as samples (samples.jsonl, the W&B table): enough to read a whole evaluation
# of the real task (64 held-out requests), since a judge's share says nothing of what the replies are.
SAMPLES_KEPT = 64


@torch.no_grad()
def evaluate(roles, tokenizer, prompts: list[str], policy: str, stage, oracle=None, num_samples: int | None = None,
             batch_size: int = 64, judge=None, judged_text=judged_text, on_task=None) -> tuple[dict, list[dict]]:
    """Metrics over ``num_samples`` sampled responses to ``prompts`` (cycled), and the first ``SAMPLES_KEPT``
    as samples."""
    num_samples = num_samples or stage.eval.eval_samples
    queries = [prompts[i % len(prompts)] for i in range(num_samples)]
    rewards, kls, nlls, lengths, samples = [], [], [], [], []
    per_source: dict[str, list[torch.Tensor]] = {}
    texts, all_responses, has_eos, verdicts = [], [], [], []
    devices = [roles.model.device] if roles.model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(EVAL_SEED)
        for start in range(0, num_samples, batch_size):
            batch = queries[start:start + batch_size]
            critic = stage.critic if stage.name == "ppo" else "none"  # the critic-free stages have none
            replies = sample(roles.model, tokenizer, batch, policy, stage)
            rollout = score(roles, replies, policy, critic, stage, tokenizer)
            mask = rollout.response_mask
            # KL(π‖π_ref) of a whole response, estimated by the sampled log-ratio sum (nats).
            kls.append(masked_sum(rollout.logprobs - rollout.ref_logprobs, mask, dim=1).cpu())
            # Fluency: the reference model's negative log-likelihood of the response, per token (nats/token).
            nlls.append((-masked_sum(rollout.ref_logprobs, mask, dim=1) / mask.sum(1).clamp(min=1)).cpu())
            rewards.append(rollout.raw_scores.cpu())
            for name, scores in (rollout.source_scores or {}).items():
                per_source.setdefault(name, []).append(scores.cpu())
            lengths.append(mask.sum(1).float().cpu())
            responses = response_texts(tokenizer, rollout)  # prompt + response = their joint decode
            has_eos += (rollout.has_eos if rollout.has_eos is not None
                        else (rollout.response_ids == tokenizer.eos_token_id).any(1)).tolist()
            all_responses += responses
            for row, (query, response) in enumerate(zip(batch, responses)):
                text = judged_text(query, response)
                texts.append(text)
                if on_task is not None:
                    verdicts.append(on_task(query, response))
                if len(samples) < SAMPLES_KEPT:
                    samples.append({"query": chat.prompt_text(tokenizer, query), "response": response,
                                    "reward": rollout.raw_scores[row].item(), **source_columns(rollout, row),
                                    "oracle": oracle(text) if oracle is not None else None,
                                    "well_formed": judge(text) if judge is not None else None,
                                    **({"on_task": verdicts[-1]} if on_task is not None else {})})
    metrics = {
        "reward_score": torch.cat(rewards).mean().item(),
        "kl": torch.cat(kls).mean().item(),
        "ref_nll": torch.cat(nlls).mean().item(),
        "response_length": torch.cat(lengths).mean().item(),
        # Each reward source's mean score, unweighted (TRL's name for a reward function's: rewards/<name>/mean).
        **{f"rewards/{name}/mean": torch.cat(scores).mean().item() for name, scores in per_source.items()},
    }
    metrics.update(response_metrics(texts, all_responses, has_eos, oracle=oracle, judge=judge,
                                    on_task=verdicts if on_task is not None else None))
    return metrics, samples


def source_columns(rollout, row: int) -> dict[str, float]:
    """Each reward source's score of response ``row``, unweighted, as ``rewards/<name>`` (a sample's columns
    beside its weighted ``reward``)."""
    return {f"rewards/{name}": scores[row].item() for name, scores in (rollout.source_scores or {}).items()}
