"""LoRA on the output layer of policy adapters (``adapter.output_layer``): where it applies, that every role
reads its own output layer (the reference never sees the policy's), and the ceiling it removes."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import compose
from marl_exp.data import reviews
from marl_exp.modeling.multi_adapter import MultiAdapterModel
from marl_exp.stages.common import adapts_output_layer, policy_lora_config


def test_output_layer_is_adapted_by_default_on_the_tiny_model_only():
    assert adapts_output_layer(compose("stage=ppo"))
    assert not adapts_output_layer(compose("stage=ppo", "model.path=/models/llama"))
    assert adapts_output_layer(compose("stage=ppo", "model.path=/models/llama", "adapter.output_layer=true"))
    assert not adapts_output_layer(compose("stage=ppo", "adapter.output_layer=false"))


def test_policy_lora_config_names_every_linear_layer_and_the_output_layer(sft):
    base = AutoModelForCausalLM.from_pretrained(sft)
    on = policy_lora_config(compose("stage=ppo"), base)
    assert set(on.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head"}
    assert policy_lora_config(compose("stage=ppo", "adapter.output_layer=false"), base).target_modules == "all-linear"
    listed = policy_lora_config(compose("stage=ppo", "adapter.target_modules=[q_proj,v_proj]"), base)
    assert set(listed.target_modules) == {"q_proj", "v_proj", "lm_head"}


def perturbed_model(sft: str, reward_dir: str) -> MultiAdapterModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(sft)
    model = MultiAdapterModel.build(base, policy_config=policy_lora_config(compose("stage=ppo"), base),
                                    reward_adapter=reward_dir)
    with torch.no_grad():  # LoRA B starts at zero: give the policy's output layer a visible delta
        for name, param in model.peft_model.named_parameters():
            if "lm_head.lora_B.policy" in name:
                param.normal_(0, 0.5)
    return model.eval()


def test_each_role_reads_its_own_output_layer_in_separate_and_fused_passes(sft, reward_dir):
    model = perturbed_model(sft, reward_dir)
    tok = AutoTokenizer.from_pretrained(sft)
    tok.padding_side = "left"
    batch = tok(["the movie was great .", "this show is"], return_tensors="pt", padding=True)
    plain = AutoModelForCausalLM.from_pretrained(sft).eval()
    with torch.no_grad():
        expected_reference = plain(**batch, position_ids=batch.attention_mask.cumsum(1) - 1).logits
        policy = model.policy_forward(batch.input_ids, batch.attention_mask).logits
        reference = model.reference_logits(batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert (policy - reference)[real].abs().max() > 0.1  # the policy's output layer is in play ...
    assert torch.allclose(reference[real], expected_reference[real], atol=1e-5)  # ... and never the reference's
    fused = model.score_roles(batch.input_ids, batch.attention_mask, ["policy", "policy"])
    assert torch.allclose(fused.policy_logits[real], policy[real], atol=1e-4)
    assert torch.allclose(fused.reference_logits[real], expected_reference[real], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("output_layer, low, high", [(False, 0.0, 0.75), (True, 0.95, 1.0)])
def test_a_policy_can_make_a_choice_confident_only_with_its_output_layer_adapted(sft, output_layer, low, high):
    """REINFORCE on the first response word of every training opening, reward 1 for a positive adjective. The
    tiny model's RMSNorm fixes the hidden state's scale and its output layer carries a weak sentiment direction,
    so LoRA on the blocks alone stalls well short of certainty (0.64 measured); with the output layer it does not."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(sft)
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(sft)
    lora = policy_lora_config(compose("stage=ppo", f"adapter.output_layer={str(output_layer).lower()}"), base)
    model = MultiAdapterModel.build(base, policy_config=lora)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    positive = torch.tensor([tok(" " + w, add_special_tokens=False).input_ids[0] for w in reviews.POSITIVE_ADJECTIVES])
    batch = tok(reviews.openings(), return_tensors="pt", padding=True)
    for _ in range(50):
        logprobs = torch.log_softmax(model.policy_forward(batch.input_ids, batch.attention_mask).logits[:, -1], -1)
        with torch.no_grad():
            words = torch.multinomial(logprobs.exp(), 4, replacement=True)
            rewards = torch.isin(words, positive).float()
            advantages = rewards - rewards.mean(1, keepdim=True)
        loss = -(advantages * logprobs.gather(1, words)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = model.policy_forward(batch.input_ids, batch.attention_mask).logits[:, -1]
    p_positive = torch.softmax(logits, -1)[:, positive].sum(-1).mean().item()
    assert low <= p_positive <= high, p_positive


def test_a_saved_policy_holds_the_output_layer_lora_but_no_copy_of_the_base(sft, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(sft)
    model = MultiAdapterModel.build(base, policy_config=policy_lora_config(compose("stage=ppo"), base))
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lm_head.lora_B.policy" in name:
                param.normal_(0, 0.5)
    model.save_policy(tmp_path / "policy")
    saved = load_file(str(tmp_path / "policy" / "adapter_model.safetensors"))
    assert any("lm_head.lora_B" in k for k in saved) and not any("embed_tokens" in k for k in saved)
    assert all("lora_" in k for k in saved)  # LoRA weights only
    ids = torch.tensor([[5, 6, 7, 8]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), tmp_path / "policy").eval()
    with torch.no_grad():
        expected = model.eval().policy_forward(ids).logits
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
