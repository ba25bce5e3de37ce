"""One short SFT -> reward -> PPO chain per model family through ``train.py`` with ``model.path=<local dir>``:
the real loading, training and saving path of each architecture (one multirun, one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from marl_exp.conformance.families import build_family_model

REPO = Path(__file__).resolve().parents[2]
# Each family in the convention its real checkpoints have (GPT-2, Llama, Mistral, Pythia: no pad token;
# Qwen: no BOS; Gemma, Phi-3: several EOS ids; OPT: its own pad; one hub-style generation config).
NATURAL = {"llama": "pad_is_eos", "gpt2": "pad_is_eos", "opt": "own_pad", "gpt_neox": "pad_is_eos",
           "qwen2": "no_bos", "mistral": "pad_is_eos", "gemma2": "multi_eos", "phi3": "multi_eos",
           "qwen3": "gen_config", "gemma3": "own_pad"}
TINY_CHAIN = ("logger=none", "upstream.sft.max_steps=3", "upstream.reward.max_steps=3", "upstream.sft.batch_size=8",
              "upstream.reward.batch_size=8", "data.num_sft_train=32", "data.num_sft_eval=8",
              "data.num_pairs_train=32", "data.num_pairs_eval=8", "stage.steps=2", "stage.batch_size=4",
              "stage.optim.mini_batch_size=4", "stage.optim.ppo_epochs=1", "stage.sampling.max_new_tokens=6", "stage.eval.eval_samples=4",
              "stage.eval.eval_every=0", "stage.save_every=0")


@pytest.mark.slow
def test_whole_chain_runs_on_every_family(tmp_path):
    paths = {family: build_family_model(family, convention) for family, convention in NATURAL.items()}
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", f"model.path={','.join(map(str, paths.values()))}",
               f"output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}", *TINY_CHAIN]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for job, (family, path) in enumerate(paths.items()):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["train/steps"] == 2, family
        for key in ("eval/before/reward_score", "eval/after/reward_score", "eval/after/kl"):
            assert isinstance(summary[key], float), (family, key)
        assert (sweep / str(job) / "policies" / "policy" / "adapter_model.safetensors").exists(), family
        # The PPO base is the SFT model trained from this family's checkpoint (its architecture, its tokenizer).
        record = json.loads((sweep / str(job) / "run_record.json").read_text())
        sft = Path(record["inputs"]["sft_model"])
        model_type = json.loads((path / "config.json").read_text())["model_type"]
        assert json.loads((sft / "config.json").read_text())["model_type"] == model_type, family
        # Same tokenizer (transformers may rewrite the file, e.g. as Qwen2Tokenizer): the same ids and specials.
        original, saved = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(sft)
        texts = ["the movie was great . i loved it .", "this show is not really boring"]
        assert saved(texts).input_ids == original(texts).input_ids, family
        assert (saved.eos_token_id, saved.bos_token) == (original.eos_token_id, original.bos_token), family
