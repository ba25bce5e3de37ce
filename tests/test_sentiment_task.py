"""data=movie_sentiment: the request generator, the lexicons, pairs from a model's own replies (and their cache),
the preset experiment=smollm2_sentiment with a built-in model as stage.sft_model, and a smoke run on SmolLM2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose
from marl_exp.data import sentiment


# ------------------------------------------------------------------------------------------- requests
def _contents(split: str, seed: int = 1234) -> list[str]:
    return [messages[-1]["content"] for messages in sentiment.requests(split, seed)]


def test_held_out_requests_share_no_title_word_and_no_phrasing_with_training():
    train_words = {w for t in sentiment.titles("train") for w in t.split()[1:]}
    eval_words = {w for t in sentiment.titles("eval") for w in t.split()[1:]}
    assert train_words and eval_words and not train_words & eval_words
    assert not set(sentiment.PHRASINGS["train"]) & set(sentiment.PHRASINGS["eval"])
    for text in _contents("eval"):
        assert not any(f'"{t}"' in text for t in sentiment.titles("train"))
    assert not set(_contents("train")) & set(_contents("eval"))
    # Every combination once: 64 titles x 8 genres x 5 phrasings, 16 x 8 x 2.
    assert len(set(_contents("train"))) == len(_contents("train")) == 64 * 8 * 5
    assert len(set(_contents("eval"))) == len(_contents("eval")) == 16 * 8 * 2


def test_requests_are_seeded():
    assert _contents("train", seed=7) == _contents("train", seed=7)
    assert _contents("train", seed=7) != _contents("train", seed=8)
    assert sorted(_contents("train", seed=7)) == sorted(_contents("train", seed=8))


def test_requests_carry_no_sentiment_of_their_own():
    """The judges read the reply alone, but a reply may repeat the request: its words must score 0."""
    loaded = [t for split in sentiment.SPLITS for t in _contents(split)
              if sentiment.vader_score(t) != 0 or sentiment.afinn_score(t) != 0]
    assert loaded == []


# ------------------------------------------------------------------------------------------- lexicons
def _vader_compound(valences: list[float]) -> float:
    """VADER's normalisation of a sum of word valences (Hutto & Gilbert 2014): x / sqrt(x^2 + 15)."""
    total = sum(valences)
    return total / math.sqrt(total * total + 15)


# Word valences from the lexicon files (vader_lexicon.txt; AFINN-en-165.txt): great 3.1 / 3, loved 2.9 / 3,
# boring -1.3 / -3, terrible -2.1 / -3.
@pytest.mark.parametrize("text, vader, afinn", [
    ("The movie was great and I loved it.", _vader_compound([3.1, 2.9]), 6.0),
    ("A boring, terrible film.", _vader_compound([-1.3, -2.1]), -6.0),
    ("The film is two hours long.", 0.0, 0.0),
])
def test_lexicon_scores_match_hand_computed_values(text, vader, afinn):
    assert sentiment.vader_score(text) == pytest.approx(vader, abs=5e-5)  # VADER rounds to 4 decimals
    assert sentiment.afinn_score(text) == afinn
    assert sentiment.afinn_positive(text) is (afinn > 0)


def test_lexicon_gold_reward_is_vader_of_the_reply():
    from marl_exp import rewards

    prompts = [[{"role": "user", "content": "Review it."}]] * 2
    replies = ["The movie was great and I loved it.", "A boring, terrible film."]
    assert rewards.vader_compound(prompts, replies) == pytest.approx(
        [_vader_compound([3.1, 2.9]), _vader_compound([-1.3, -2.1])], abs=5e-5)


def test_best_vs_worst_pairs_the_extremes_only_past_the_margin():
    prompt = [{"role": "user", "content": "Review it."}]
    replies = ["A film.", "The movie was great and I loved it.", "A boring, terrible film."]
    pair = sentiment.best_vs_worst(prompt, replies, margin=0.5)
    assert pair["chosen"][0]["content"] == replies[1] and pair["rejected"][0]["content"] == replies[2]
    gap = _vader_compound([3.1, 2.9]) - _vader_compound([-1.3, -2.1])  # 1.4999
    assert sentiment.best_vs_worst(prompt, replies, margin=gap + 0.01) is None


# ------------------------------------------------------------------------------------- on-task check
REQUEST = [{"role": "user", "content": 'Write a review of "The Velvet Bridge", a western movie.'}]


@pytest.mark.parametrize("reply, expected", [
    ("The Velvet Bridge is a slow ride, but I liked it.", True),  # names the film
    ("A bridge too far: I adored every minute.", True),  # a title word, any case
    ("The plot drags and the acting is wooden.", True),  # film talk, no title
    ("A fine western with a big heart.", True),  # the genre is film talk
    ("Great science fiction, clever and warm.", True),  # a two-word genre
    ("I'd be happy to help you write a great review of this movie!", False),  # a service, about a movie
    ("Thank you! Let me know if our team can do anything else.", False),
    ("What a wonderful, sunny day. Everything is great.", False),  # cheerful, about nothing
    ("The Velvet Underground's new album is great.", True),  # a title word: the check is coarse, not a reader
])
def test_on_task_asks_for_the_film_and_no_service_talk(reply, expected):
    assert sentiment.on_task(REQUEST, reply) is expected


def test_on_task_reads_the_title_of_every_request():
    for split in sentiment.SPLITS:
        for request in sentiment.requests(split, seed=3)[:40]:
            title = sentiment.requested_title(request)
            assert title in sentiment.titles(split)
            assert sentiment.on_task(request, f"I loved {title.split()[-1].lower()}.")  # the title's last word
            assert not sentiment.on_task(request, "I loved it.")


def test_the_task_reports_the_on_task_check():
    from marl_exp.data import build_task

    cfg = compose("data=movie_sentiment")
    assert build_task(cfg.data).on_task is sentiment.on_task


# ------------------------------------------------------------------------------ pairs from own replies
@pytest.fixture
def tiny_task_parts(tmp_path, monkeypatch):
    """The task on the tiny model (random weights: some sampled byte pieces are sentiment words), with a fresh
    replies cache, and a count of the sampling calls."""
    from marl_exp.modeling.loading import resolve_model_path

    cfg = compose("data=movie_sentiment", "data.chat_template=chatml", "data.num_pairs_train=12",
                  "data.num_pairs_eval=6", "data.pair_min_gap=0.05")
    model_dir = resolve_model_path(cfg.model)  # built before the cache moves: only the replies go there
    monkeypatch.setenv("MARL_EXP_CACHE", str(tmp_path / "cache"))
    calls = []
    sample = sentiment.sample_replies
    monkeypatch.setattr(sentiment, "sample_replies", lambda *a, **k: calls.append(1) or sample(*a, **k))
    return cfg, model_dir, calls


def _task(cfg, model_dir):
    return sentiment.sentiment_task(cfg.data, model_dir, replies_per_request=4, reply_tokens=12)


def test_pairs_are_own_replies_ordered_by_vader_and_cached(tiny_task_parts):
    cfg, model_dir, calls = tiny_task_parts
    pairs = _task(cfg, model_dir).pairs_train
    assert len(pairs) > 0 and calls == [1]
    for chosen, rejected in zip(pairs["chosen"], pairs["rejected"]):
        gap = sentiment.vader_score(chosen[0]["content"]) - sentiment.vader_score(rejected[0]["content"])
        assert gap >= cfg.data.pair_min_gap
    requests = [m[-1]["content"] for m in sentiment.requests("train", cfg.data.seed)[:12]]
    assert all(p[-1]["content"] in requests for p in pairs["prompt"])

    again = _task(cfg, model_dir).pairs_train  # a new task: the replies come from the cache
    assert calls == [1] and again.to_list() == pairs.to_list()
    assert len(list((Path(os.environ["MARL_EXP_CACHE"]) / "sentiment-replies").glob("*.jsonl"))) == 1


def test_pairs_fit_the_reward_stage_or_fail_with_one_line(tiny_task_parts):
    from marl_exp.data import chat
    from marl_exp.data.checks import DataError, fit_pairs
    from marl_exp.modeling.loading import load_tokenizer

    cfg, model_dir, _ = tiny_task_parts
    task = _task(cfg, model_dir)
    tokenizer = load_tokenizer(model_dir)
    chat.apply_template(tokenizer, cfg.data, conversational=True)
    for pairs in (task.pairs_train, task.pairs_eval):
        assert fit_pairs(pairs, tokenizer, 256, "error", "pairs").to_list() == pairs.to_list()
    with pytest.raises(DataError, match="raise stage.max_length"):
        fit_pairs(task.pairs_train, tokenizer, 16, "error", "pairs")


def test_no_pair_past_the_margin_is_an_error_not_an_empty_dataset(tiny_task_parts):
    from marl_exp.config import ConfigError

    cfg, model_dir, _ = tiny_task_parts
    cfg.data.pair_min_gap = 0.999  # no two replies of the random tiny model are that far apart
    with pytest.raises(ConfigError, match="pair_min_gap"):
        _task(cfg, model_dir).pairs_train


def test_build_task_passes_the_model_dir_and_other_tasks_ignore_it(tiny_task_parts):
    from marl_exp.data import build_task

    cfg, model_dir, calls = tiny_task_parts
    task = build_task(cfg.data, model_dir=model_dir)
    assert task.name == "movie_sentiment" and task.judge is sentiment.afinn_positive
    assert len(task.prompts_eval) == cfg.data.max_eval_samples
    assert build_task(compose().data, model_dir=model_dir).name == "reviews"


# -------------------------------------------------------------------------- preset and built-in inputs
def test_preset_composes_and_passes_preflight(tmp_path):
    from marl_exp.run import preflight

    cfg = compose("experiment=smollm2_sentiment", f"output_dir={tmp_path}")
    assert cfg.stage.sft_model == "builtin:smollm2" and cfg.data.name == "movie_sentiment"
    preflight.check(cfg, overrides=[])
    gold = compose("experiment=smollm2_sentiment", "+rewards=vader_gold", f"output_dir={tmp_path}")
    preflight.check(gold, overrides=["+rewards=vader_gold"])


def test_preflight_names_a_wrong_built_in_sft_model(tmp_path):
    from marl_exp.config import ConfigError
    from marl_exp.run import preflight

    cfg = compose("experiment=smollm2_sentiment", "stage.sft_model=builtin:smollm3", f"output_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"stage.sft_model='builtin:smollm3' is not a built-in model"):
        preflight.check(cfg, overrides=[])


def test_train_py_prints_the_preset():
    result = subprocess.run([sys.executable, "train.py", "experiment=smollm2_sentiment", "--cfg", "job"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: movie_sentiment" in result.stdout and "path: builtin:smollm2" in result.stdout
    assert "sft_model: ${model.path}" in result.stdout  # unresolved: --cfg job prints the composed config


def test_built_in_sft_model_resolves_to_its_directory(tmp_path):
    from marl_exp.modeling.loading import resolve_model_path
    from marl_exp.stages.pipeline import resolve_inputs

    cfg = compose("stage=reward", "stage.sft_model=builtin:tiny", f"output_dir={tmp_path}")
    assert resolve_inputs(cfg) == {"sft_model": str(Path(resolve_model_path(cfg.model)).resolve())}
    assert not (tmp_path / "cache").exists()  # no SFT stage was run for it


def test_a_reward_adapter_trained_on_the_built_in_base_passes_the_base_check(tmp_path):
    from marl_exp.config import ConfigError
    from marl_exp.modeling.gguf_import import smollm2_dir
    from marl_exp.provenance import write_base_record
    from marl_exp.run import preflight

    try:  # imported here if no earlier test did (tests may run in any order, or in parallel)
        base = smollm2_dir()
    except ConfigError as err:
        pytest.skip(f"SmolLM2 wheel unavailable: {err}")
    assert base == preflight.built_in_model_dir("builtin:smollm2")  # where preflight looks is where it is built
    adapter = tmp_path / "reward_adapter"
    adapter.mkdir()
    write_base_record(adapter, str(base), "smollm2-135m-instruct", base)  # as the reward stage records it
    preflight.check_same_base(str(adapter), "builtin:smollm2", allow_mismatch=False)
    tiny = compose()
    from marl_exp.modeling.loading import resolve_model_path

    write_base_record(adapter, resolve_model_path(tiny.model), "tiny", Path(resolve_model_path(tiny.model)))
    with pytest.raises(ConfigError, match="was trained on base"):
        preflight.check_same_base(str(adapter), "builtin:smollm2", allow_mismatch=False)


# ---------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_sentiment_chain_runs_end_to_end(tmp_path, monkeypatch):
    """Plumbing on the real model, tiny sizes: pairs from 8 + 4 requests x 2 replies x 16 tokens -> reward adapter
    (2 steps) -> GRPO (2 steps of 4 replies), judged on 4 held-out replies before and after."""
    from functools import partial

    from marl_exp.stages.pipeline import run_stage

    monkeypatch.setattr(sentiment, "sentiment_task",
                        partial(sentiment.sentiment_task, replies_per_request=2, reply_tokens=16))
    cache_path = sentiment.replies_cache_path  # fresh replies: sampled by this run, not an earlier one
    monkeypatch.setattr(sentiment, "replies_cache_path",
                        lambda settings: tmp_path / "replies" / cache_path(settings).name)
    cfg = compose("experiment=smollm2_sentiment", f"output_dir={tmp_path}", "threads=2",
                  "data.num_pairs_train=8", "data.num_pairs_eval=4", "data.pair_min_gap=0.05",
                  "upstream.reward.max_steps=2", "upstream.reward.batch_size=4",
                  "stage.steps=2", "stage.batch_size=4", "stage.sampling.num_generations=2",
                  "stage.sampling.max_new_tokens=16", "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=4",
                  "stage.save_every=2")
    summary = run_stage(cfg, tmp_path / "run")
    assert len(list((tmp_path / "replies").glob("*.jsonl"))) == 2  # train and held-out requests
    reward = json.loads(next((tmp_path / "cache").glob("reward-*/summary.json")).read_text())
    assert reward["train/steps"] == 2
    for when in ("before", "after"):  # the judge: AFINN's share of positive replies to held-out requests
        assert summary[f"eval/{when}/well_formed"] in {0.0, 0.25, 0.5, 0.75, 1.0}
        assert summary[f"eval/{when}/distinct_2"] > 0
