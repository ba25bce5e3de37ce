"""bench/real_model.py's bookkeeping on a hand-made run dir: phase minutes from the log's timestamps and the steps'
own times, the targets as committed, the table, and --collect rebuilding rows from run dirs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import real_model  # noqa: E402  (bench/ is not a package)

LOG = """[2026-12-07 07:00:00,000][marl_exp][INFO] - threads: 2 torch/OpenMP threads (threads=2)
[2026-12-07 07:00:30,000][marl_exp.stages.pipeline][INFO] - no cached reward output: running the reward stage into x
[2026-12-07 07:10:00,000][marl_exp.data.sentiment][INFO] - movie_sentiment train: 384 pairs from 400 requests
[2026-12-07 07:12:00,000][marl_exp.data.sentiment][INFO] - movie_sentiment eval: 61 pairs from 64 requests
[2026-12-07 07:21:00,000][marl_exp.stages.reward][INFO] - reward adapter saved to y (held-out pairwise accuracy 0.852)
[2026-12-07 07:21:00,000][marl_exp.stages.rl][INFO] - RL stops responses at token ids [2]
eval before step 0/2: reward -0.2 | well formed 0.5
[2026-12-07 07:31:00,000][marl_exp][INFO] - run finished: z
"""
BEFORE = {"well_formed": 0.5, "ref_nll": 3.0, "distinct_2": 0.9, "kl": 0.0, "reward_score": -0.2, "response_length": 40}


def make_run(stamp: Path, after: dict, seed: int = 4301) -> Path:
    run_dir = stamp / f"fp32-seed{seed}" / "grpo"
    run_dir.mkdir(parents=True)
    (run_dir.parent / "grpo.log").write_text(LOG)
    metrics = [{"step": 0, **{f"eval/before/{k}": v for k, v in BEFORE.items()}},
               {"step": 1, "time/step": 240.0}, {"step": 2, "time/step": 300.0},
               {"step": 2, **{f"eval/after/{k}": v for k, v in after.items()}}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {f"eval/{when}/{k}": v for when, values in (("before", BEFORE), ("after", after)) for k, v in values.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "resolved_config.yaml").write_text("seed: 4301\nthreads: '2'\n")
    return run_dir


GOOD = {"well_formed": 0.9, "ref_nll": 3.4, "distinct_2": 0.7, "kl": 9.0, "reward_score": 1.5, "response_length": 40}


def test_phase_minutes_come_from_the_log_and_the_steps_own_times(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    # launch -> reward stage 0.5 min; pairs 07:00:30 -> 07:12 = 11.5; training -> 07:21 = 9; the RL stage's 10 min
    # are 9 min of steps (240 + 300 s) and 1 min of evaluations.
    assert real_model.phases(run_dir) == {"start": 0.5, "pairs": 11.5, "reward_training": 9.0, "rl_steps": 9.0,
                                          "evaluations": 1.0}


@pytest.mark.parametrize("change, missed", [
    ({}, []),
    ({"well_formed": 0.84}, ["judge_after"]),
    ({"well_formed": 0.69, "distinct_2": 0.9}, ["judge_after", "judge_rise"]),
    ({"ref_nll": 3.51}, ["fluency"]),
    ({"distinct_2": 0.67}, ["diversity"]),  # 0.75 x 0.9 = 0.675
    ({"kl": 10.01}, ["kl"]),
])
def test_each_target_fails_just_past_its_committed_bound(tmp_path, change, missed):
    row = real_model.run_row("grpo", "fp32", 4301, make_run(tmp_path, {**GOOD, **change}), 50.0, True)
    assert [k for k, ok in row["passed"].items() if not ok] == missed
    line = real_model.table([row]).splitlines()[-1]
    assert line.endswith("| 50.0* (2) | " + ("met |" if not missed else f"missed: {', '.join(missed)} |")), line


@pytest.mark.parametrize("after_on_task, met", [(0.81, True), (0.79, False)])
def test_the_on_task_share_may_fall_at_most_its_committed_bound(tmp_path, monkeypatch, after_on_task, met):
    monkeypatch.setitem(BEFORE, "on_task", 0.9)
    row = real_model.run_row("grpo", "fp32", 4301, make_run(tmp_path, {**GOOD, "on_task": after_on_task}), 50.0, True)
    assert row["passed"]["on_task"] is met  # 0.9 - 0.10 = 0.80
    assert f"| 0.50 → 0.90 | 0.90 → {after_on_task:.2f} |" in real_model.table([row])


def test_a_run_before_the_on_task_check_is_not_held_to_it(tmp_path):
    row = real_model.run_row("grpo", "fp32", 4301, make_run(tmp_path, GOOD), 50.0, True)
    assert "on_task" not in row["passed"] and "| 0.50 → 0.90 | not checked |" in real_model.table([row])


def test_collect_rebuilds_rows_from_run_dirs_and_keeps_the_recorded_time_and_command(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    (run_dir / "row.json").write_text(json.dumps({"algorithm": "grpo", "quant": "fp32", "seed": 4301, "minutes": 54.1,
                                                  "command": "python train.py seed=4301"}))  # an older row: no phases
    (row,) = real_model.collect(tmp_path)
    assert row["minutes"] == 54.1 and row["command"] == "python train.py seed=4301"
    assert row["phases_min"]["rl_steps"] == 9.0 and row["after/well_formed"] == 0.9 and row["reward_stage_ran"]
    assert row["reward_heldout_accuracy"] == 0.852


def test_collect_builds_the_row_of_a_run_resumed_outside_the_benchmark_without_its_wall_time(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    stopped = LOG.split("eval before")[0] + "[2026-12-07 07:25:00,000][marl_exp.stages.rl][INFO] - stopping\n"
    resumed = ("[2026-12-08 09:00:00,000][marl_exp.stages.rl][INFO] - resumed from "
               f"{run_dir}/checkpoints/step-000001 at step 1\n[2026-12-08 09:05:00,000][marl_exp][INFO] - run finished: z\n")
    log = run_dir.parent / "grpo.log"
    (run_dir / "INTERRUPTED").write_text("stopped at step 1; resume with stage.resume=auto")
    log.write_text(stopped)
    assert real_model.collect(tmp_path) == []  # stopped, not resumed: no row
    (run_dir / "row.json").write_text(json.dumps({"algorithm": "grpo", "quant": "fp32", "seed": 4301, "minutes": 25.0,
                                                  "failed": True}))  # what the benchmark writes as it stops
    assert real_model.collect(tmp_path) == []  # the failed row.json the benchmark wrote as it stopped stays
    log.write_text(stopped + resumed)
    assert real_model.collect(tmp_path) == []  # resumed but stopped again (the marker is back): no row
    (run_dir / "INTERRUPTED").unlink()
    (row,) = real_model.collect(tmp_path)
    assert row["minutes"] is None and row["resumed_at_step"] == 1 and row["after/well_formed"] == 0.9
    # the RL stage's wall time spans the day between the two processes: no evaluation minutes from it
    assert row["phases_min"]["rl_steps"] == 9.0 and "evaluations" not in row["phases_min"]
    assert "| resumed* (2) | met |" in real_model.table([row])


def test_the_default_chain_is_timed_from_its_log_and_held_to_the_45_minute_target(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    log = tmp_path / "chain.log"
    log.write_text(LOG.replace("run finished: z", f"run finished: {run_dir}"))
    row = real_model.chain_row(log)
    assert row["minutes"] == 31.0  # 07:00 -> 07:31
    assert row["phases_min"]["pairs"] == 11.5 and row["reward_stage_ran"] and row["reward_heldout_accuracy"] == 0.852
    assert row["passed"]["default_chain_minutes"] is True and row["seed"] == 4301
    assert row["step_median_s"] == {"time/step": 270.0}  # the median of the steps' own 240 and 300 s
    log.write_text(LOG.replace("07:31:00,000][marl_exp][INFO] - run finished: z",
                               f"07:45:01,000][marl_exp][INFO] - run finished: {run_dir}"))
    assert real_model.chain_row(log)["passed"]["default_chain_minutes"] is False  # 45.02 min
    log.write_text(LOG.replace("run finished: z", ""))
    with pytest.raises(SystemExit, match="no 'run finished"):
        real_model.chain_row(log)


def test_the_top_opening_counts_the_held_out_replies_that_begin_alike(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    replies = {"before": ["A fine film here.", "Slow and dull.", "A fine film indeed."],
               "after": ["I'm thrilled to share it.", "I'm thrilled to say yes.", "Great film.", "I'm thrilled, really."]}
    rows = [{"eval": when, "split": "eval", "step": 0, "response": text} for when, texts in replies.items()
            for text in texts] + [{"eval": "train", "split": "train", "step": 1, "response": "I'm thrilled to a"}]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    row = real_model.run_row("grpo", "fp32", 4301, run_dir, 50.0, True)
    assert row["before/top_opening"] == {"text": "A fine film", "count": 2, "of": 3}
    assert row["after/top_opening"] == {"text": "I'm thrilled to", "count": 2, "of": 4}  # training replies not counted


def test_a_gold_reward_run_is_named_by_its_reward_function(tmp_path):
    run_dir = make_run(tmp_path, GOOD)
    adapter = real_model.run_row("grpo", "fp32", 4301, run_dir, 50.0, True)
    assert adapter["reward"] == "reward adapter" and real_model.table([adapter]).splitlines()[-1].startswith("| grpo |")
    (run_dir / "resolved_config.yaml").write_text(
        "seed: 4301\nthreads: '2'\nstage:\n  rewards:\n    vader_compound:\n      adapter: null\n"
        "      function: marl_exp.rewards:vader_compound\n      weight: 1.0\n")
    gold = real_model.run_row("grpo", "fp32", 4301, run_dir, 50.0, True)
    assert gold["reward"] == "vader_compound"
    assert real_model.table([gold]).splitlines()[-1].startswith("| grpo (vader_compound) | fp32 | 4301 |")


def test_only_the_published_results_file_draws_the_docs_plots(tmp_path):
    published = real_model.common.RESULTS / "real_model.json"
    assert real_model.plot_path(published, None) == REPO / "docs" / "real_model.png"
    assert real_model.plot_path(tmp_path / "stamp" / "real_model.json", None) == tmp_path / "stamp" / "real_model.png"
    assert real_model.plot_path(published, tmp_path / "mine.png") == tmp_path / "mine.png"
