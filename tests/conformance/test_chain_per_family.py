"""One short SFT -> reward -> PPO chain per model family through ``train.py`` with ``model.path=<local dir>``:
the real loading, training and saving path of each architecture (one multirun, one process), and a reward
adapter that learned: it ranks held-out pairs above chance, scored by HF's own classifier + peft."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import QUICK, compose
from marl_exp.config import DataConfig
from marl_exp.conformance.families import FAMILIES, build_family_model, family_info
from marl_exp.data.task import build_task
from marl_exp.stages import reward
from marl_exp.stages.pipeline import run_stage

REPO = Path(__file__).resolve().parents[2]
# Each family in the convention its real checkpoints have (GPT-2, Llama, Mistral, Pythia: no pad token;
# Qwen: no BOS; Gemma, Phi-3: several EOS ids; OPT: its own pad; one hub-style generation config).
NATURAL = {"llama": "pad_is_eos", "gpt2": "pad_is_eos", "opt": "own_pad", "gpt_neox": "pad_is_eos",
           "qwen2": "no_bos", "mistral": "pad_is_eos", "gemma2": "multi_eos", "phi3": "multi_eos",
           "qwen3": "gen_config", "gemma3": "own_pad"}
# The reward stage trains long enough to rank pairs on every family; SFT and PPO only run. At 150 steps of 16 of
# 2400 pairs at 3e-3, held-out accuracy (512 pairs, the reward stage alone, seeds 0/1/2) is 0.76/0.79 Llama,
# 0.67/0.65 GPT-2, 0.63/0.67/0.65 OPT: the tiny OPT learns slowest (0.56, 0.63, 0.74 at 75, 150, 300 steps;
# Llama 0.65, 0.76, 0.82).
TINY_CHAIN = ("logger=none", "upstream.sft.max_steps=3", "upstream.reward.max_steps=150", "upstream.sft.batch_size=8",
              "upstream.reward.batch_size=16", "upstream.reward.learning_rate=3e-3", "data.num_sft_train=32",
              "data.num_sft_eval=8", "data.num_pairs_train=2400", "data.num_pairs_eval=8", "stage.steps=2", "stage.batch_size=4",
              "stage.optim.mini_batch_size=4", "stage.optim.ppo_epochs=1", "stage.sampling.max_new_tokens=6", "stage.eval.eval_samples=4",
              "stage.eval.eval_every=0", "stage.save_every=0")


# The task's held-out pairs (the run evaluates on the first 8 of them), never trained on. 512, not 64: at 64 the
# test needs 0.66 to pass, which OPT's 0.63 misses as often as not; at 512 it needs 0.55.
HELD_OUT_PAIRS = 512
ALPHA = 0.01  # one-sided exact binomial test against chance (0.5): at 512 pairs, 283 or more ranked right


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): how often chance ranks k or more of n pairs right."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


@torch.no_grad()
def ranked_right(sft_dir: str, reward_adapter: str, pairs) -> int:
    """How many held-out pairs HF's sequence classifier + the saved adapter score chosen above rejected, on
    the input RewardTrainer trains on (the text, then EOS; pad token as TRL sets it: pad, else EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(reward_adapter)
    classifier = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = PeftModel.from_pretrained(classifier, reward_adapter).eval()

    def scores(texts, batch_size=128):
        batches = ([t + tokenizer.eos_token for t in texts[i:i + batch_size]] for i in range(0, len(texts), batch_size))
        return torch.cat([model(**tokenizer(batch, return_tensors="pt", padding=True, padding_side="right")).logits[:, 0]
                          for batch in batches])

    return int((scores(pairs["chosen"]) > scores(pairs["rejected"])).sum())


@pytest.mark.slow
def test_whole_chain_runs_on_every_family(tmp_path):
    paths = {family: build_family_model(family, convention) for family, convention in NATURAL.items()}
    sweep = tmp_path / "sweep"
    command = [sys.executable, "train.py", "-m", f"model.path={','.join(map(str, paths.values()))}",
               f"output_dir={tmp_path / 'out'}", f"hydra.sweep.dir={sweep}", *TINY_CHAIN]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
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
    # Every family's reward adapter learned: it ranks held-out pairs above chance.
    pairs = build_task(OmegaConf.structured(DataConfig(num_pairs_eval=HELD_OUT_PAIRS))).pairs_eval
    assert "prompt" not in pairs.column_names  # full texts: nothing to join
    right = {}
    for job, family in enumerate(paths):
        inputs = json.loads((sweep / str(job) / "run_record.json").read_text())["inputs"]
        right[family] = ranked_right(inputs["sft_model"], inputs["reward_adapter"], pairs)
    print(f"\nheld-out pairs ranked right of {len(pairs)}: {right}")
    at_chance = {family: f"{k}/{len(pairs)}" for family, k in right.items() if binomial_tail(k, len(pairs)) > ALPHA}
    assert not at_chance, f"reward adapters not above chance (p > {ALPHA}): {at_chance}; all: {right}"


@pytest.mark.parametrize("family", [f for f in FAMILIES if family_info(f, "own_pad")["has_in_layer_dropout"]])
def test_reward_model_trains_without_dropout(family, tmp_path, monkeypatch):
    """RewardConfig.disable_dropout (on by default): the reward model trains as it scores, in every family.
    Reference: the same model's forward in eval mode, where no dropout is ever drawn. TRL zeroes nn.Dropout
    modules; OPT's decoder applies functional dropout from a float attribute."""
    logits = {}

    class ProbedTrainer(reward.RewardTrainer):
        def train(self, *args, **kwargs):
            batch = next(iter(self.get_train_dataloader()))
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
            for mode in ("train", "eval"):
                self.model.train(mode == "train")
                with torch.no_grad():
                    logits[mode] = self.model(**inputs).logits
            self.model.train()
            return super().train(*args, **kwargs)

    monkeypatch.setattr(reward, "RewardTrainer", ProbedTrainer)
    model_dir = build_family_model(family, "own_pad")
    run_stage(compose("stage=reward", *QUICK, "stage.max_steps=1", f"stage.sft_model={model_dir}",
                      f"model.path={model_dir}", f"output_dir={tmp_path}"), tmp_path / "run")
    torch.testing.assert_close(logits["train"], logits["eval"])
