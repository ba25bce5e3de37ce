"""bench/overoptimization.py's reading of a run: curves against √KL, the standardised proxy, the table row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import overoptimization

    return overoptimization


def _write_metrics(path: Path, proxy: bool = True) -> Path:
    """A PPO run's metrics.jsonl as the stage writes it with +rewards=monitor_gold: evaluations at steps 0, 2, 4
    and a training record per step (the first one's RM std 0.5 standardises the proxy)."""
    def evaluation(tag, step, kl, gold, rm, well_formed):
        record = {"step": step, f"eval/{tag}/kl": kl, f"eval/{tag}/oracle_strict": gold,
                  f"eval/{tag}/well_formed": well_formed, f"eval/{tag}/oracle_score": gold + 0.1,
                  f"eval/{tag}/reward_score": rm if proxy else gold}
        if proxy:
            record[f"eval/{tag}/rewards/reward/mean"] = rm
        # The unseen-subjects split must not be read as the headline split.
        record[f"eval/{tag}/unseen_subjects/oracle_strict"] = 0.99
        return record

    def training(step, kl, gold, rm, std):
        record = {"step": step, "objective/kl": kl, "rewards/oracle_strict/mean": gold,
                  "rewards/oracle_strict/std": 0.3}
        if proxy:
            record.update({"rewards/reward/mean": rm, "rewards/reward/std": std})
        return record

    rows = [evaluation("before", 0, 0.0, 0.50, 0.1, 0.9), training(1, 0.0, 0.48, 0.2, 0.5),
            training(2, 1.0, 0.55, 0.4, 0.9), evaluation("during", 2, 4.0, 0.70, 0.6, 0.8),
            training(3, 3.0, 0.40, 0.8, 0.7), training(4, 9.0, 0.30, 1.0, 0.6), evaluation("after", 4, 16.0, 0.20, 1.1, 0.3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_put_held_out_evaluations_at_sqrt_kl_and_standardise_the_proxy(bench, tmp_path):
    run = bench.curves(_write_metrics(tmp_path / "metrics.jsonl"), proxy="reward")
    ev = run["eval"]
    assert ev["step"] == [0, 2, 4]
    assert ev["sqrt_kl"] == [0.0, 2.0, 4.0]
    assert ev["gold"] == [0.5, 0.7, 0.2]  # the headline split, not unseen_subjects
    assert run["proxy_std0"] == 0.5  # the first training step's, not a later one
    assert ev["proxy_z"] == pytest.approx([0.0, (0.6 - 0.1) / 0.5, (1.1 - 0.1) / 0.5])
    assert run["train"] == {"step": [1, 2, 3, 4], "kl": [0.0, 1.0, 3.0, 9.0], "gold": [0.48, 0.55, 0.40, 0.30],
                            "proxy": [0.2, 0.4, 0.8, 1.0]}


def test_summary_row_finds_the_gold_peak_and_reads_the_end(bench, tmp_path):
    run = {"name": "rm300", "pairs": 300, "failed": False, "minutes": 2.5, "rm_accuracy": 0.85,
           **bench.curves(_write_metrics(tmp_path / "metrics.jsonl"), proxy="reward")}
    row = bench.summarize(run)
    assert (row["gold_start"], row["gold_peak"], row["peak_sqrt_kl"], row["peak_step"]) == (0.5, 0.7, 2.0, 2)
    assert (row["gold_final"], row["kl_final"], row["well_formed_final"]) == (0.2, 16.0, 0.3)
    assert row["proxy_final"] == pytest.approx(2.0)
    line = bench.markdown([run]).splitlines()[-1]
    assert line == "| RM on 300 pairs | 0.850 | 0.500 | 0.700 (2.00, 2) | 0.200 | +2.00 | 0.300 | 16.00 | 2.5 min |"


def test_gold_reward_run_has_no_proxy_and_a_failed_run_keeps_its_log(bench, tmp_path):
    gold = {"name": "gold", "pairs": None, "failed": False, "minutes": 1.0,
            **bench.curves(_write_metrics(tmp_path / "metrics.jsonl", proxy=False), proxy=None)}
    assert gold["eval"]["proxy_z"] == [None, None, None] and gold["proxy_std0"] is None
    failed = {"name": "rm1000", "pairs": 1000, "failed": True, "minutes": 0.1, "log": "out/rm1000.log"}
    lines = bench.markdown([gold, failed]).splitlines()
    assert lines[2] == "| gold reward (ceiling) | – | 0.500 | 0.700 (2.00, 2) | 0.200 | – | 0.300 | 16.00 | 1.0 min |"
    assert lines[3].startswith("| RM on 1000 pairs | failed (out/rm1000.log) |")
    png = tmp_path / "plot.png"
    bench.plot([gold, failed], png)
    assert png.stat().st_size > 0


def test_overrides_that_the_experiment_sets_per_run_are_refused(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "bench/overoptimization.py", "--out", str(tmp_path), "--",
                           "data.num_pairs_train=100"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "use --sizes" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_plot_lines_join_the_means_of_sqrt_kl_bins(bench):
    xs, ys = bench.binned([1.4, 0.0, 0.6, 0.2], [7.0, 1.0, 5.0, 3.0], width=0.5)  # any order of evaluations
    assert xs == pytest.approx([0.1, 0.6, 1.4]) and ys == pytest.approx([2.0, 5.0, 7.0])
