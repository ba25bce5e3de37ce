"""Preference pairs are measured against stage.max_length before the reward stage trains, as TRL's
RewardTrainer tokenizes them (which drops longer pairs without a word): one line and exit 2, or counted skips."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from conftest import REPO, compose
from marl_exp.data import build_task, chat
from marl_exp.data.checks import DataError, fit_pairs, pair_token_lengths
from marl_exp.modeling.loading import resolve_model_path


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    return resolve_model_path(compose().model)


def trl_lengths(model_dir: str, tokenizer, pairs: Dataset, work) -> tuple[list[int], list[int]]:
    """The independent reference: the ids TRL's RewardTrainer builds (no length filter)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    trainer = RewardTrainer(model=model, processing_class=tokenizer, train_dataset=pairs,
                            args=RewardConfig(output_dir=str(work), report_to="none", use_cpu=True, max_length=None))
    data = trainer.train_dataset
    return [len(x) for x in data["chosen_ids"]], [len(x) for x in data["rejected_ids"]]


@pytest.mark.parametrize("data", ["reviews", "reviews_chat"])
def test_lengths_are_the_reward_trainers(tiny_dir, tmp_path, data):
    cfg = compose(f"data={data}", "data.num_pairs_train=40")
    task = build_task(cfg.data)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    chat.apply_template(tokenizer, cfg.data, chat.is_conversational(task.pairs_train[0]))
    pairs = task.pairs_train.select(range(40))
    ours = pair_token_lengths(pairs, tokenizer)
    assert ours == trl_lengths(tiny_dir, tokenizer, pairs, tmp_path)
    assert min(ours[0] + ours[1]) > 3  # real texts, not an empty render


def long_pairs(tokenizer, n_long: int, n_short: int) -> Dataset:
    short, long = "the movie was great .", "the movie was great . " * 12
    rows = [long] * n_long + [short] * n_short
    return Dataset.from_dict({"chosen": rows, "rejected": [short] * len(rows)})


def test_over_long_pairs_fail_in_one_line_naming_count_longest_and_key(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    pairs = long_pairs(tokenizer, n_long=3, n_short=5)
    longest = max(pair_token_lengths(pairs, tokenizer)[0])
    with pytest.raises(DataError) as err:
        fit_pairs(pairs, tokenizer, 20, "error", "my pairs")
    message = str(err.value)
    assert "\n" not in message and "3 of 8 pairs" in message and f"has {longest}" in message
    assert "stage.max_length=20" in message and "data.on_bad_row=skip" in message


def test_skip_drops_and_counts_but_never_leaves_nothing(tiny_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    kept = fit_pairs(long_pairs(tokenizer, 3, 5), tokenizer, 20, "skip", "my pairs")
    assert len(kept) == 5 and all(len(c.split()) < 10 for c in kept["chosen"])
    assert "skipped 3 of 8 pairs" in caplog.text
    with pytest.raises(DataError, match="3 of 3 pairs"):  # skipping them all would train on nothing
        fit_pairs(long_pairs(tokenizer, 3, 0), tokenizer, 20, "skip", "my pairs")
    unchanged = long_pairs(tokenizer, 0, 4)
    assert fit_pairs(unchanged, tokenizer, 20, "error", "my pairs") is unchanged


def test_reward_stage_refuses_before_loading_the_model(tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", "debug=reward", "stage.max_length=6", f"output_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("marl-exp: error:")]
    assert len(error_lines) == 1 and "pairs are longer than stage.max_length=6" in error_lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - started < 120  # the SFT it needs is built first; the reward model never loads
