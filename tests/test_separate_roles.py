"""Both sharing modes give the reference the logits of the plain HF model's own forward.

The KL reference is the base model. Families whose forward transforms the LM head's output (Gemma 2 caps
it, Cohere scales it, Granite divides it) must get that transform in ``sharing=separate`` too, not only in
the shared path. The independent reference: ``AutoModelForCausalLM`` of the same weights, called on the
same left-padded batch with positions counted over the real tokens (as ``generate`` does).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

from marl_exp.conformance.checks import TOLERANCE, perturb
from marl_exp.modeling.multi_adapter import MultiAdapterModel, position_ids_from_mask
from marl_exp.rl.roles import SeparateRoles, SharedRoles

VOCAB = 96
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, initializer_range=0.2)
# Each family with its logit transform set where it changes the logits a lot (a random model's logits reach
# well past a cap of 2 with a wide init; Cohere's default scale is 1/16).
CONFIGS = {
    "llama": lambda: LlamaConfig(**_SIZES),
    "gemma2": lambda: Gemma2Config(**_SIZES, head_dim=16, final_logit_softcapping=2.0),
    "cohere": lambda: CohereConfig(**_SIZES, logit_scale=0.0625),
    "granite": lambda: GraniteConfig(**_SIZES, logits_scaling=8.0),
}
LENGTHS = [9, 6, 3]  # left padding of 0, 3 and 6 tokens
POLICY = "policy"


def random_model(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    width = max(LENGTHS)
    ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(LENGTHS):
        ids[row, width - length:] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, width - length:] = 1
    return ids, mask


def both_roles(plain) -> dict:
    """Shared and separate roles over copies of ``plain``, with a policy adapter that changes the logits."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    shared = MultiAdapterModel.build(copy.deepcopy(plain), policy_config=lora, policy_name=POLICY)
    separate = MultiAdapterModel.build(copy.deepcopy(plain), policy_config=lora, policy_name=POLICY)
    for model in (shared, separate):
        perturb(model, POLICY, std=0.5)
    return {"shared": SharedRoles(shared), "separate": SeparateRoles(separate, copy.deepcopy(plain), None)}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_reference_logits_equal_the_plain_models_forward(family):
    plain = random_model(family)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    real = mask.bool()
    width = ids.shape[1]
    tolerance = TOLERANCE["fp32"]  # the same matmuls in another batch layout
    for mode, roles in both_roles(plain).items():
        policy = roles.policy_outputs(ids, mask, POLICY, "value_head").logits.detach()
        assert (policy - expected)[real].abs().max() > 100 * tolerance, "the policy adapter must move the logits"
        for positions in (None, slice(width - 4, width - 1), slice(2, 5)):
            ours = roles.reference_logits(ids, mask, logits_positions=positions)
            at = slice(None) if positions is None else positions
            gap = float((ours - expected[:, at])[real[:, at]].abs().max())
            assert gap <= tolerance, f"{family} {mode} reference, positions {positions}: max |ours - HF| = {gap:.3g}"
        # What the PPO loop reads: the reference logits of its scoring pass (fused in shared mode).
        at = slice(width - 4, width - 1)
        scored = roles.score(ids, mask, [POLICY] * len(LENGTHS), "value_head", at, reward=False).reference_logits
        gap = float((scored - expected[:, at])[real[:, at]].abs().max())
        assert gap <= tolerance, f"{family} {mode} scoring pass: max |ours - HF| = {gap:.3g}"
