"""Each tolerance of ``reference_logits`` and ``reward_position`` still catches the bugs the checks exist for,
in every quant mode: a bug is seeded into the code under test (never into the reference), and the check
must FAIL in every sharing mode the bug reaches. The clean run passes (test_invariants.py)."""

from __future__ import annotations

import pytest
import torch

from marl_exp.conformance.checks import check_model
from marl_exp.conformance.families import build_family_model
from marl_exp.modeling import multi_adapter
from marl_exp.rl import roles as roles_module
from marl_exp.rl import rollout

QUANTS = ("fp32", "bf16", "8bit", "4bit")


def read_one_token_early(monkeypatch):
    """The shared model's reward read one token before HF's classifier reads it."""
    index = multi_adapter.reward_token_index
    monkeypatch.setattr(multi_adapter, "reward_token_index", lambda *args: (index(*args) - 1).clamp(min=0))


def reward_input_loses_its_last_token(monkeypatch):
    """PPO's reward input drops its last real token (the EOS RewardTrainer appended), in either mode."""
    build = rollout.reward_inputs

    def shorter(*args):
        ids, mask = build(*args)
        last = multi_adapter.last_token_index(mask)
        rows = torch.arange(len(ids))
        ids, mask = ids.clone(), mask.clone()
        ids[rows, last], mask[rows, last] = args[-1], 0
        return ids, mask

    monkeypatch.setattr(rollout, "reward_inputs", shorter)


def positions_over_padding(monkeypatch):
    """Positions counted from the first column, padding included (left padding shifts every real token)."""
    def from_first_column(mask):
        return torch.arange(mask.shape[-1]).expand_as(mask)

    for module in (multi_adapter, roles_module):
        monkeypatch.setattr(module, "position_ids_from_mask", from_first_column)


def reference_with_the_policy_adapter_on(monkeypatch):
    for cls in (roles_module.SharedRoles, roles_module.SeparateRoles):
        monkeypatch.setattr(cls, "reference_logits",
                            lambda self, ids, mask, logits_positions=None: self.model.policy_forward(ids, mask).logits)


def hidden_states_rounded_to_bf16(monkeypatch):
    """The reference's last hidden state rounded to bf16 before the LM head: a precision bug of ~1e-2."""
    logits = multi_adapter.causal_lm_logits

    def rounded(model, hidden, positions=None):
        return logits(model, hidden.to(torch.bfloat16).float(), positions)

    for module in (multi_adapter, roles_module):
        monkeypatch.setattr(module, "causal_lm_logits", rounded)


BOTH = ("shared", "separate")
# (bug, check, family, convention, the sharing modes it reaches, quant modes). pad_is_eos: the convention whose
# reward position was wrong; own_pad where pad == EOS would hide the dropped EOS (HF reads the token before it).
# Positions over padding: GPT-2's learned absolute positions (rotary ones see only differences, unchanged).
SEEDED = [
    (read_one_token_early, "reward_position", "llama", "pad_is_eos", ("shared",), QUANTS),
    (reward_input_loses_its_last_token, "reward_position", "llama", "own_pad", BOTH, QUANTS),
    (positions_over_padding, "reference_logits", "gpt2", "pad_is_eos", BOTH, ("fp32", "bf16")),
    (positions_over_padding, "reward_position", "gpt2", "pad_is_eos", BOTH, ("fp32", "bf16")),
    (reference_with_the_policy_adapter_on, "reference_logits", "llama", "pad_is_eos", BOTH, QUANTS),
    # A precision bug is below 8-bit's and bf16's own noise; fp32 and 4-bit (fp32 compute) must see it.
    (hidden_states_rounded_to_bf16, "reference_logits", "llama", "pad_is_eos", BOTH, ("fp32", "4bit")),
]
CASES = [pytest.param(bug, check, family, convention, modes, quant, id=f"{bug.__name__}-{check}-{quant}")
         for bug, check, family, convention, modes, quants in SEEDED for quant in quants]


@pytest.mark.parametrize("bug,check,family,convention,modes,quant", CASES)
def test_a_seeded_bug_fails_the_check(bug, check, family, convention, modes, quant, monkeypatch, tmp_path):
    model_dir = build_family_model(family, convention)
    bug(monkeypatch)
    results = check_model(model_dir, quant=quant, checks=(check,), sharing=modes, workdir=tmp_path)
    assert [r.sharing for r in results] == list(modes)
    caught = [r for r in results if not r.passed]
    assert caught == results, "\n".join(f"{r.sharing}: {r.detail}" for r in results if r.passed)
