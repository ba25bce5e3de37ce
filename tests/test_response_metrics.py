"""Evaluation metrics from response texts (``response_metrics``), by hand, and in a real PPO stage run."""

from __future__ import annotations

import json

import pytest

from marl_exp.data.reviews import oracle_score, oracle_strict, well_formed
from marl_exp.data.response_metrics import distinct_n, response_metrics


def test_distinct_n_by_hand():
    responses = [" a b a", " b a", ""]
    # unigrams a b a b a: 2 distinct of 5; bigrams (a b) (b a) (b a): 2 of 3.
    assert distinct_n(responses, 1) == pytest.approx(2 / 5)
    assert distinct_n(responses, 2) == pytest.approx(2 / 3)
    assert distinct_n(["great great great great"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["a", "b"], 2) == 0.0  # an n-gram never spans two responses
    assert distinct_n([], 1) == 0.0


def test_response_metrics_by_hand_with_the_reviews_judges():
    queries = ["the movie was"] * 4
    responses = [" great . i loved it .",  # review, oracle 1
                 " boring . i hated it .",  # review, oracle 0
                 " great",  # stub, oracle 1
                 " great great"]  # not a review, oracle 1
    texts = [q + r for q, r in zip(queries, responses)]
    metrics = response_metrics(texts, responses, [True, True, False, True], oracle=oracle_score, judge=well_formed)
    assert metrics == pytest.approx({
        "eos_fraction": 3 / 4,
        "oracle_score": 3 / 4,
        "well_formed": 2 / 4,
        "oracle_strict": 1 / 4,  # = mean of oracle_strict over the texts
        # words: great . i loved it . boring . i hated it . great great great = 15; distinct: great . i
        # loved it boring hated = 7
        "distinct_1": 7 / 15,
        # bigrams: 5 + 5 + 0 + 1 = 11, all distinct but ". i" and "it ." (2 repeats)
        "distinct_2": 9 / 11,
    })
    assert metrics["oracle_strict"] == pytest.approx(sum(map(oracle_strict, texts)) / 4)


def test_on_task_share_and_judge_and_on_task_share_by_hand():
    texts = responses = ["good", "good", "bad", "bad", "good"]
    judge = lambda text: text == "good"  # noqa: E731
    on_task = [True, False, True, False, True]
    metrics = response_metrics(texts, responses, [True] * 5, judge=judge, on_task=on_task)
    assert metrics["well_formed"] == pytest.approx(3 / 5)
    assert metrics["on_task"] == pytest.approx(3 / 5)
    assert metrics["well_formed_on_task"] == pytest.approx(2 / 5)  # rows 0 and 4: judged good and on task
    assert "well_formed_on_task" not in response_metrics(texts, responses, [True] * 5, on_task=on_task)
    with pytest.raises(ValueError, match="on-task verdicts"):
        response_metrics(texts, responses, [True] * 5, judge=judge, on_task=on_task[:4])


def test_response_metrics_without_judges_has_only_the_text_metrics():
    metrics = response_metrics(["q a"], [" a"], [False])
    assert metrics == {"eos_fraction": 0.0, "distinct_1": 1.0, "distinct_2": 0.0}
    assert set(response_metrics(["q a"], [" a"], [True], oracle=oracle_score)) == {
        "eos_fraction", "distinct_1", "distinct_2", "oracle_score"}


@pytest.mark.parametrize("texts,responses,eos", [([], [], []), (["a"], ["a", "b"], [True]), (["a"], ["a"], [])])
def test_response_metrics_refuses_mismatched_or_empty_inputs(texts, responses, eos):
    with pytest.raises(ValueError, match="as many texts"):
        response_metrics(texts, responses, eos)


def test_ppo_stage_reports_the_metrics_on_both_evaluation_splits(trained_chain, tmp_path, monkeypatch):
    from conftest import compose
    from marl_exp.stages import rl
    from marl_exp.stages.pipeline import run_stage

    def with_on_task(data_cfg, **kwargs):  # a task's on-task check reads (prompt, response), like movie_sentiment's
        task = build_task(data_cfg, **kwargs)
        task.on_task = on_task
        return task

    def on_task(prompt, response: str) -> bool:
        assert isinstance(prompt, str) and isinstance(response, str)
        return "great" in response

    build_task = rl.build_task
    monkeypatch.setattr(rl, "build_task", with_on_task)

    cfg = compose("stage=ppo", "logger=none", f"output_dir={tmp_path}", f"stage.sft_model={trained_chain['sft_model']}",
                  f"stage.reward_adapter={trained_chain['reward_adapter']}", "stage.steps=1", "stage.batch_size=4",
                  "stage.optim.mini_batch_size=2", "stage.optim.ppo_epochs=1", "stage.eval.eval_samples=8", "stage.eval.eval_every=0",
                  "stage.save_every=0")
    summary = run_stage(cfg, tmp_path / "run")
    names = ("reward_score", "kl", "response_length", "oracle_score", "oracle_strict", "well_formed", "eos_fraction",
             "distinct_1", "distinct_2", "on_task", "well_formed_on_task")
    for tag in ("before", "after"):
        for split in ("", "unseen_subjects/"):
            for name in names:
                value = summary[f"eval/{tag}/{split}{name}"]
                assert value == value, (tag, split, name)  # present and not NaN
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {(s["eval"], s["split"]) for s in samples} == {(t, s) for t in ("before", "after")
                                                         for s in ("eval", "unseen_subjects")}
    # With 8 samples every response is in samples.jsonl: the summary's means are those of its rows.
    for tag in ("before", "after"):
        for split, infix in (("eval", ""), ("unseen_subjects", "unseen_subjects/")):
            rows = [s for s in samples if s["eval"] == tag and s["split"] == split]
            texts = [s["query"] + s["response"] for s in rows]
            assert len(rows) == 8 and [s["well_formed"] for s in rows] == [well_formed(t) for t in texts]
            assert summary[f"eval/{tag}/{infix}well_formed"] == pytest.approx(sum(map(well_formed, texts)) / 8)
            assert summary[f"eval/{tag}/{infix}oracle_strict"] == pytest.approx(sum(map(oracle_strict, texts)) / 8)
            assert summary[f"eval/{tag}/{infix}oracle_score"] == pytest.approx(sum(s["oracle"] for s in rows) / 8)
            assert [s["on_task"] for s in rows] == [on_task(s["query"], s["response"]) for s in rows]
            assert summary[f"eval/{tag}/{infix}on_task"] == pytest.approx(sum(s["on_task"] for s in rows) / 8)
            assert summary[f"eval/{tag}/{infix}well_formed_on_task"] == pytest.approx(
                sum(s["on_task"] and s["well_formed"] for s in rows) / 8)
    assert summary["eval/before/well_formed"] >= 0.5  # the SFT policy writes reviews
