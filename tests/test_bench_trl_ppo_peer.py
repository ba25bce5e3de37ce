"""The PPO peer benchmark against TRL 0.11.4 (bench/trl_ppo_peer.py): its pure parts in seconds, and a smoke run of
one step of each framework on the tiny model when the TRL 0.11.4 venv has been built (``--build-venv``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import trl_ppo_peer as peer  # noqa: E402

WORK = peer.Work(batch=4, mini_batch_size=2, ppo_epochs=2, new_tokens=3)  # 4 optimizer steps, 12 tokens per step


def step(seconds: float, **over) -> dict:
    record = {"event": "step", "seconds": seconds, "sample": seconds / 4, "score": seconds / 4,
              "score_policy_reference": seconds / 8, "score_reward": seconds / 16, "update": seconds / 2,
              "tokens": 12, "prompt_tokens": 20, "optimizer_steps": 4, "skipped_updates": 0, "scoring_passes": 3,
              "kl": 0.0, "native": {"time/x": seconds}}
    return {**record, **over}


def framework(seconds: list[float], **over) -> dict:
    load = {"event": "ready", "precision": ["float32"], "versions": {}, "conversions": [], "base_params": 10,
            "model_bytes": 40}
    done = {"event": "done", "rss_steps_peak_above_baseline_mib": 50.0,
            "rss_phase_peak_above_baseline_mib": {"sample": 1.0, "score": 2.0, "update": 50.0}}
    return {"load": load, "steps": [step(s, **over) for s in seconds], "done": done}


def test_the_same_work_passes_and_every_difference_is_named():
    out = {"marl-exp": framework([1.0, 1.0, 1.0, 1.0]), "trl": framework([2.0, 2.0, 2.0, 2.0])}
    row = peer.summarize_size("tiny", out, WORK)
    assert row["same_work"] and row["mismatches"] == []
    assert row["ratio"]["step_time_paired"] == {"q1": 0.5, "median": 0.5, "q3": 0.5}
    assert row["ratio"]["update_time"] == pytest.approx(0.5)

    out["trl"] = framework([2.0] * 4, tokens=10, prompt_tokens=21, optimizer_steps=3, scoring_passes=2)
    out["trl"]["load"]["precision"] = ["bfloat16"]
    out["marl-exp"] = framework([1.0] * 4, skipped_updates=1, kl=None)
    problems = " | ".join(peer.summarize_size("tiny", out, WORK)["mismatches"])
    for needle in ("trl generated [10] tokens per step, not [12]", "trl made [3] optimizer steps per step, not 4",
                   "marl-exp skipped 4 update(s)", "marl-exp reported no KL", "prompt tokens per step differ",
                   "forward passes in scoring differ", "precision differs"):
        assert needle in problems


def test_the_paired_ratio_is_per_round_and_its_quartiles_are_reported():
    out = {"marl-exp": framework([1.0, 2.0, 3.0, 4.0]), "trl": framework([2.0, 2.0, 2.0, 2.0])}
    paired = peer.summarize_size("tiny", out, WORK)["ratio"]["step_time_paired"]
    assert paired == {"q1": 1.0, "median": 1.25, "q3": 2.0}  # 0.5 1 1.5 2, as trl_peer.py takes quartiles


def test_the_table_shows_both_frameworks_the_ratio_and_the_verdicts():
    good = peer.summarize_size("tiny", {"marl-exp": framework([1.0] * 3), "trl": framework([2.0] * 3)}, WORK)
    bad = peer.summarize_size("smollm2", {"marl-exp": framework([1.0] * 3), "trl": framework([1.2] * 3, tokens=9)},
                              WORK)
    text = peer.markdown({"work": peer.asdict(WORK), "threads": 2, "sizes": [good, bad]})
    assert ("| tiny | marl-exp | 1.000 s | 0.250 s | 0.250 s (0.125 · 0.062) | 0.500 s | 12 | 4 | 3 | float32 "
            "| 50 MiB |") in text
    assert "| tiny | TRL 0.11.4 | 2.000 s |" in text
    assert "| tiny | 0.50 (0.50–0.50) | 0.50 · 0.50 · 0.50 | yes | yes |" in text
    assert "| smollm2 | 0.83 (0.83–0.83) |" in text and "**no**: trl generated [9] tokens" in text
    assert text.splitlines()[-1].endswith("| **no** |")  # 0.83 > 0.7


def test_transformers_5_dirs_are_read_through_a_copy_that_transformers_4_46_and_peft_0_13_understand(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                  "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}))
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "backend": "x",
                                                            "eos_token": "</s>"}))
    (base / "model.safetensors").write_bytes(b"weights")
    legacy, notes = peer.legacy_base_dir(base, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    assert config["rope_theta"] == 100000.0 and "rope_parameters" not in config and "rope_scaling" not in config
    assert config["torch_dtype"] == "float32"
    tokenizer = json.loads((legacy / "tokenizer_config.json").read_text())
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>"}
    assert (legacy / "model.safetensors").is_symlink() and (legacy / "model.safetensors").read_bytes() == b"weights"
    assert len(notes) == 3
    assert json.loads((base / "config.json").read_text())["rope_parameters"]  # the original is untouched

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_version": "0.21.2", "lora_bias": False}))
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    legacy, notes = peer.legacy_adapter_dir(adapter, tmp_path / "legacy_adapter", {"r"})
    assert json.loads((legacy / "adapter_config.json").read_text()) == {"r": 16}
    assert notes == ["reward adapter_config: dropped keys peft 0.13 does not know: lora_bias=False, "
                     "peft_version='0.21.2'"]


def test_the_trl_reward_input_is_marl_exps_query_response_eos_left_padded():
    import torch

    ids, mask, positions = peer.left_padded_reward_inputs(
        [torch.tensor([1]), torch.tensor([1, 6, 7])], [torch.tensor([8, 9]), torch.tensor([10, 2])],
        eos_token_id=2, pad_token_id=0)
    assert ids.tolist() == [[0, 1, 8, 9, 2], [1, 6, 7, 10, 2]]  # EOS appended, not doubled
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_the_module_imports_in_the_trl_venv_without_marl_exp():
    """The TRL worker imports bench/trl_ppo_peer.py (and through it common, trl_peer, memory) in the TRL 0.11.4
    venv: their module-level imports must be the standard library and each other only."""
    allowed = set(sys.stdlib_module_names) | {"__future__", "common", "trl_peer", "memory"}
    for name in ("trl_ppo_peer", "common", "trl_peer", "memory"):
        tree = ast.parse((REPO / "bench" / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert {m.split(".")[0] for m in modules} <= allowed, f"bench/{name}.py imports {modules} at module level"


def test_an_unbuilt_venv_is_not_ready(tmp_path):
    assert not peer.venv_ready(tmp_path)
    (tmp_path / peer.VENV_MARKER).write_text(json.dumps({"requested": ["trl==0.11.4"]}))
    assert not peer.venv_ready(tmp_path)  # no python there, and not what this version asks for


@pytest.mark.skipif(not peer.venv_ready(peer.default_trl_venv()),
                    reason="no TRL 0.11.4 venv (python bench/trl_ppo_peer.py --build-venv)")
def test_one_step_of_each_framework_on_the_tiny_model_does_the_same_work(tmp_path):
    out = tmp_path / "trl_ppo_peer.json"
    cmd = [sys.executable, str(REPO / "bench" / "trl_ppo_peer.py"), "--sizes", "tiny", "--warmup", "0", "--steps", "1",
           "--batch", "4", "--new-tokens", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    row = result["sizes"][0]
    assert row["same_work"], row["mismatches"]
    for fw in ("marl-exp", "trl"):
        r = row[fw]
        assert r["tokens_per_step"] == [16] and r["optimizer_steps_per_step"] == [4] and r["scoring_passes"] == [3]
        assert r["precision"] == ["float32"] and r["torch_threads"] == 1
        assert r["step"]["seconds"] > 0 and r["step"]["sample"] > 0 and r["step"]["update"] > 0
    assert row["marl-exp"]["prompt_tokens"] == row["trl"]["prompt_tokens"]
    assert result["versions"]["trl"]["trl"] == "0.11.4" and result["versions"]["trl"]["transformers"].startswith("4.46")
    assert any("loaded as saved" in note for note in result["conversions"]["tiny"])
    assert "| tiny | TRL 0.11.4 |" in proc.stdout
