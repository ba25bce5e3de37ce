"""The PPO invariants on every model family x tokenizer convention (fp32), and in 8-bit / 4-bit for two
families: reference = plain model, reward = HF classifier + peft on RewardTrainer's input, KL 0 and ratio 1
for a fresh policy (with and without gradient checkpointing), sampling parity with the scored softmax,
gradients where (and only where) they belong; those that read the reference or reward role in both sharing
modes. See marl_exp.conformance.checks for each check.
"""

from __future__ import annotations

import pytest
import torch

from marl_exp.conformance import ROLE_CHECKS, SHARING_MODES
from marl_exp.conformance.checks import ALPHA, CHECKS, check_model, chi_square, chi_square_critical, format_table
from marl_exp.conformance.families import CONVENTIONS, FAMILIES, build_family_model

MATRIX = [(family, convention) for family in FAMILIES for convention in CONVENTIONS]
QUANTIZED = [(family, quant) for family in ("llama", "qwen2") for quant in ("8bit", "4bit")]


def assert_all_pass(results, title):
    assert [(r.name, r.sharing) for r in results] == [
        (name, mode) for name in CHECKS for mode in (SHARING_MODES if name in ROLE_CHECKS else (None,))]
    failed = [r for r in results if not r.passed]
    assert not failed, format_table(results, title)


@pytest.mark.parametrize("family,convention", MATRIX)
def test_invariants_hold(family, convention, tmp_path):
    assert_all_pass(check_model(build_family_model(family, convention), workdir=tmp_path), f"{family} {convention}")


@pytest.mark.parametrize("family,quant", QUANTIZED)
def test_invariants_hold_quantized(family, quant, tmp_path):
    convention = "pad_is_eos"  # the convention whose reward position was wrong
    assert_all_pass(check_model(build_family_model(family, convention), quant=quant, workdir=tmp_path),
                    f"{family} {convention} {quant}")


def test_the_sampling_check_catches_a_models_own_generation_config(tmp_path):
    # The negative control of the parity test: sampling the way generate would with the model's
    # generation_config (temperature 0.6, top-p 0.9, repetition penalty) is detected.
    result, = check_model(build_family_model("llama", "gen_config"), checks=("sampling_parity",), workdir=tmp_path)
    assert result.passed and "(detected: True)" in result.detail, result.detail


def test_chi_square_accepts_the_true_distribution_and_rejects_another():
    probs = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02])
    generator = torch.Generator().manual_seed(0)
    drawn = torch.multinomial(probs, 4000, replacement=True, generator=generator)
    statistic, critical, bins = chi_square(drawn, probs)
    assert statistic <= critical and bins == 7
    tilted = probs.clone()
    tilted[0], tilted[1] = 0.45, 0.25  # a 5-point shift of mass between two tokens
    assert chi_square(drawn, tilted)[0] > critical
    # Wilson-Hilferty against tabulated quantiles of chi-square (alpha 0.001): dof 10 -> 29.59, 50 -> 86.66.
    assert chi_square_critical(10, ALPHA) == pytest.approx(29.59, rel=0.01)
    assert chi_square_critical(50, ALPHA) == pytest.approx(86.66, rel=0.005)


def test_check_model_command(tmp_path, capsys):
    import subprocess
    import sys

    from marl_exp.conformance.cli import main

    model_dir = build_family_model("mistral", "pad_is_eos")
    assert main([str(model_dir), "--checks", "reference_logits,reward_position"]) == 0
    table = capsys.readouterr().out
    for check in ("reference_logits", "reward_position"):
        assert all(f"| {check} | {mode} | pass |" in table for mode in SHARING_MODES), table
    # Bad arguments: one line, exit 2, before torch is imported (fast).
    for args, message in (([str(tmp_path)], "is not a model directory (no config.json)"),
                          ([str(model_dir), "--checks", "nope"], "unknown check(s) nope"),
                          ([str(model_dir), "--sharing", "both"], "unknown sharing mode(s) both")):
        done = subprocess.run([sys.executable, "-m", "marl_exp", "check-model", *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
