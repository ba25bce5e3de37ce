"""Fluency in the evaluation: ``ref_nll`` is the reference model's mean per-token negative log-likelihood of
the sampled responses, equal to the plain HF model's on each prompt + response, unpadded."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from conftest import compose
from marl_exp.modeling.loading import load_tokenizer, resolve_device, resolve_model_path
from marl_exp.rl import evaluate as evaluate_module
from marl_exp.stages.rl_models import build_roles

PROMPTS = ["the movie was", "this show is", "the plot felt", "the cast seemed"]


def test_ref_nll_is_the_plain_models_per_token_nll_of_the_responses(tmp_path, monkeypatch):
    base = resolve_model_path(compose().model)
    cfg = compose("stage=grpo", f"output_dir={tmp_path}", f"stage.sft_model={base}", "logger=none",
                  "+rewards=oracle_strict", "stage.sampling.max_new_tokens=6")
    assert cfg.stage.sampling.temperature == 1.0  # the reference's log-probs are those of the plain model
    roles = build_roles(cfg, base, None, resolve_device("cpu"))
    tokenizer = load_tokenizer(base)
    rollouts = []
    score = evaluate_module.score
    monkeypatch.setattr(evaluate_module, "score", lambda *a, **k: rollouts.append(score(*a, **k)) or rollouts[-1])
    metrics, _ = evaluate_module.evaluate(roles, tokenizer, PROMPTS, "policy", cfg.stage, num_samples=8)

    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    per_response = []
    with torch.no_grad():
        for r in rollouts:
            for q, qm, a, am in zip(r.query_ids, r.query_mask, r.response_ids, r.response_mask):
                query, response = q[qm.bool()], a[am.bool()]
                ids = torch.cat([query, response])[None]
                logprobs = plain(ids).logits[0, :-1].log_softmax(-1)
                taken = logprobs[len(query) - 1:].gather(-1, response[:, None])[:, 0]
                per_response.append(-taken.mean().item())
    assert len(per_response) == 8 and min(per_response) > 0
    expected = sum(per_response) / len(per_response)
    assert abs(metrics["ref_nll"] - expected) <= 1e-4, (metrics["ref_nll"], expected)
