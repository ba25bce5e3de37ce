"""quant=bf16: the whole chain (SFT → reward → PPO) runs, adapters and heads keep fp32 weights, and the
reward scores PPO reads agree with HF's sequence classifier + peft at the same dtype."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import compose
from marl_exp import AutoModelForCausalLMWithValueHead
from marl_exp.data import reviews
from marl_exp.modeling.multi_adapter import position_ids_from_mask
from marl_exp.stages.pipeline import run_stage

pytestmark = pytest.mark.slow  # every test here reads the chain the module fixture trains (~1 min on 2 cores)

# Max |score - HF bf16 reference| over the 48 left-padded texts below. The reference's own bf16 noise floor,
# measured on the chain this module trains (scores -1.4..1.2): the same HF + peft bf16 model on the same texts
# one at a time unpadded 0.0078, right-padded 0.0117 (fp32: 5e-7); ours 0.0031. HF bf16 against HF fp32 is
# 0.037, so this also tells a base scored in fp32 from one scored in bf16. ~2x the floor.
BF16_SCORE_TOLERANCE = 0.025


@pytest.fixture(scope="module")
def bf16_chain(tmp_path_factory):
    """``python train.py debug=ppo quant=bf16``: SFT (fp32, upstream default), reward and PPO in bf16."""
    out = tmp_path_factory.mktemp("bf16")
    cfg = compose("debug=ppo", "quant=bf16", f"output_dir={out}")
    summary = run_stage(cfg, out / "run")
    (sft_entry,) = (out / "cache").glob("sft-*")
    (reward_entry,) = (out / "cache").glob("reward-*")
    return {"summary": summary, "run": out / "run", "sft_model": sft_entry / "model", "reward_entry": reward_entry,
            "reward_adapter": reward_entry / "reward_adapter"}


def lora_b_norm(weights: dict) -> float:
    return sum(v.float().norm().item() for k, v in weights.items() if "lora_B" in k)


def test_whole_chain_runs_in_bf16_with_fp32_adapters(bf16_chain):
    # The reward stage ran in bf16 (upstream.reward.quant=same) and trained its adapter: LoRA B starts at 0.
    reward_cfg = yaml.safe_load((bf16_chain["reward_entry"] / "resolved_config.yaml").read_text())
    assert reward_cfg["quant"]["mode"] == "bf16" and reward_cfg["stage"]["name"] == "reward"
    reward_summary = json.loads((bf16_chain["reward_entry"] / "summary.json").read_text())
    assert reward_summary["train/steps"] == 20 and 0.0 <= reward_summary["eval/pairwise_accuracy"] <= 1.0
    reward_weights = load_file(bf16_chain["reward_adapter"] / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") for k in reward_weights)
    assert lora_b_norm(reward_weights) > 0
    # Adapters and heads train in fp32 (their optimizer state too) over the bf16 base.
    assert {v.dtype for v in reward_weights.values()} == {torch.float32}

    # PPO ran its 4 steps in bf16 and moved the policy away from the reference.
    summary = bf16_chain["summary"]
    assert yaml.safe_load((bf16_chain["run"] / "resolved_config.yaml").read_text())["quant"]["mode"] == "bf16"
    assert summary["train/steps"] == 4
    for key in ("eval/before/reward_score", "eval/after/reward_score", "eval/after/oracle_score", "eval/after/kl"):
        assert summary[key] == summary[key], key  # present and not NaN
    policy = load_file(bf16_chain["run"] / "policies" / "policy" / "adapter_model.safetensors")
    assert lora_b_norm(policy) > 0 and {v.dtype for v in policy.values()} == {torch.float32}
    assert summary["eval/after/kl"] > 0


# ------------------------------------------------------------------------- scores against HF + peft
@pytest.fixture(scope="module")
def texts(bf16_chain) -> list[str]:
    """48 held-out reviews (24 preference pairs, as test_compat scores), EOS appended as in training."""
    eos = AutoTokenizer.from_pretrained(bf16_chain["sft_model"]).eos_token
    generator = reviews.ReviewGenerator(seed=4321)
    chosen, rejected = zip(*(generator.preference_pair(0.25) for _ in range(24)))
    return [r.text + eos for r in chosen + rejected]


def left_padded(tokenizer, texts: list[str]):
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def hf_scores(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        positions = position_ids_from_mask(inputs["attention_mask"])
        return model(**inputs, position_ids=positions).logits[:, 0].float()


@pytest.fixture(scope="module")
def hf_bf16(bf16_chain):
    """HF's AutoModelForSequenceClassification in bf16 + PeftModel on the bf16-trained reward adapter."""
    seq_cls = AutoModelForSequenceClassification.from_pretrained(bf16_chain["sft_model"], num_labels=1,
                                                                 dtype=torch.bfloat16)
    return PeftModel.from_pretrained(seq_cls, bf16_chain["reward_adapter"]).eval()


def test_bf16_reward_scores_match_hf_peft_at_the_same_dtype(bf16_chain, texts, hf_bf16):
    tokenizer = AutoTokenizer.from_pretrained(bf16_chain["sft_model"])
    inputs = left_padded(tokenizer, texts)
    reference = hf_scores(hf_bf16, inputs)
    # The reference's noise floor: the same model and texts in other batch shapes (bf16 sums differ).
    alone = torch.cat([hf_scores(hf_bf16, tokenizer([t], return_tensors="pt")) for t in texts])
    tokenizer.padding_side = "right"
    right_padded = hf_scores(hf_bf16, tokenizer(texts, return_tensors="pt", padding=True))
    floor = max((alone - reference).abs().max().item(), (right_padded - reference).abs().max().item())

    policy = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        bf16_chain["sft_model"], peft_config=policy, reward_adapter=str(bf16_chain["reward_adapter"]),
        dtype=torch.bfloat16)
    assert model.pretrained_model.get_base_model().dtype == torch.bfloat16
    ours = model.compute_reward_score(**inputs)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    print(f"bf16 scores {reference.min().item():.3g}..{reference.max().item():.3g}: HF noise floor {floor:.4g}, "
          f"max |ours - HF| {diff:.4g}")
    assert floor <= BF16_SCORE_TOLERANCE  # the tolerance still stands above the reference's own noise
    assert diff <= BF16_SCORE_TOLERANCE, f"max |score - HF bf16 reference| = {diff}"
