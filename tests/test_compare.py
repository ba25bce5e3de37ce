"""``marl-exp compare``: tables and learning curves from run dirs, on a real (tiny) rank sweep and on run
dirs built here (effective-config labels, sorting, seed groups, smoothing, markers)."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, compose
from marl_exp import compare
from marl_exp.config import to_yaml

TINY_LORA_SFT = ("logger=none", "stage=sft", "stage.finetune=lora", "stage.max_steps=3", "stage.logging_steps=1",
                 "stage.batch_size=8", "stage.eval_batch_size=8", "data.num_sft_train=32", "data.num_sft_eval=8")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory) -> Path:
    """A real multirun over two LoRA ranks; returns its multirun dir."""
    out = tmp_path_factory.mktemp("rank_sweep")
    result = run([sys.executable, "train.py", "-m", *TINY_LORA_SFT, "adapter.r=2,8", f"output_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "multirun").glob("*/*")
    return sweep


def _fake_run(path: Path, overrides: list[str], summary: dict | None, metrics=(), failed: str | None = None,
              status: str = "finished"):
    """A run dir as a run leaves it: Hydra's overrides, the effective config, metrics, and a summary whose
    one segment ended with ``status`` (none when ``summary`` is None)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "resolved_config.yaml").write_text(to_yaml(compose(*overrides)))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps({**summary, "segments": [{"segment": 0, "status": status}]}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if failed:
        (path / "FAILED").write_text(failed + "\n\nTraceback ...\n")
    return path


# ------------------------------------------------------------------------------------------ real sweep
@pytest.mark.slow
def test_compare_a_rank_sweep_table(rank_sweep, capsys):
    assert compare.main([str(rank_sweep), "--sort", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["run", "status", "step", "adapter.r"]  # only the config value that differs
    assert "eval/loss" in header and "time/total_s" in header
    assert "stage" not in lines[0] and "logger" not in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("0", "ok", "3", "2"), ("1", "ok", "3", "8")]
    # Sorted by the first metric (eval/loss: lowest first) when not told otherwise.
    compare.main([str(rank_sweep)])
    losses = [float(line.split()[header.index("eval/loss")]) for line in capsys.readouterr().out.splitlines()[2:]]
    assert losses == sorted(losses)


@pytest.mark.slow
def test_compare_markdown_and_csv_parse(rank_sweep, capsys):
    compare.main([str(rank_sweep), "--format", "csv", "--sort", "none"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["adapter.r"] for row in table] == ["2", "8"]
    summaries = [json.loads((rank_sweep / n / "summary.json").read_text()) for n in ("0", "1")]
    assert [float(row["eval/loss"]) for row in table] == [s["eval/loss"] for s in summaries]

    compare.main([str(rank_sweep), "--format", "markdown", "--metrics", "eval/loss,eval/perplexity", "--sort",
                  "none"])
    lines = capsys.readouterr().out.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == ["run", "status", "step", "adapter.r", "eval/loss", "eval/perplexity"]
    assert set(lines[1]) <= set("|-:")
    assert [row[3] for row in cells[2:]] == ["2", "8"]
    assert all(len(row) == len(cells[0]) for row in cells)


@pytest.mark.slow
def test_compare_plots_learning_curves(rank_sweep, tmp_path):
    import matplotlib.image

    out = tmp_path / "curves.png"
    # Through the console-script entry point: `marl-exp compare` dispatches before Hydra.
    result = run([sys.executable, "-m", "marl_exp", "compare", str(rank_sweep), "--plot", str(out)])
    assert result.returncode == 0, result.stderr
    assert "adapter.r" in result.stdout
    assert out.stat().st_size > 0
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not blank
    # Two coloured lines (one per rank) were drawn: count pixels of tab10's first two colours.
    blue, orange = (0x1F / 255, 0x77 / 255, 0xB4 / 255), (0xFF / 255, 0x7F / 255, 0x0E / 255)
    for colour in (blue, orange):
        close = (abs(image[..., :3] - colour) < 0.03).all(axis=-1)
        assert close.sum() > 50, colour
    runs = compare.load_runs([rank_sweep])
    train_loss = next(c for c in compare.CURVES if c.title == "train/loss")
    assert all(compare._curve(r, train_loss.pattern) for r in runs)  # train/loss was logged per step


@pytest.mark.slow
def test_a_run_dir_and_the_multirun_dir_above_it(rank_sweep):
    assert [r.path.name for r in compare.load_runs([rank_sweep.parent.parent])] == ["0", "1"]
    (single,) = compare.load_runs([rank_sweep / "1"])
    assert single.summary and not single.failed
    # One run: the keys it overrode (but where it logs and writes), with their effective values.
    assert compare.differing_keys([single]) == [k for k in single.overrides if k not in ("logger", "output_dir")]
    assert [single.value(k) for k in ("stage", "adapter.r")] == ["sft", 8]


# ------------------------------------------------------------------------------------------ fake runs
def test_failed_and_killed_runs_show_as_such(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", ["stage=ppo", "adapter.r=8"], {"eval/after/oracle_score": 0.8, "eval/after/kl": 2.0},
              [{"step": 1, "env/reward_mean": 0.1, "objective/kl": 0.0},
               {"step": 2, "env/reward_mean": 0.5, "objective/kl": 1.0, "eval/during/oracle_score": 0.7}])
    _fake_run(sweep / "1", ["stage=ppo", "adapter.r=0"], None, failed="ConfigError: adapter.r=0 must be > 0")
    _fake_run(sweep / "10", ["stage=ppo", "adapter.r=32"], {"eval/after/oracle_score": 0.9})
    # Killed at step 5: its summary was written at the start, its process is gone.
    _fake_run(sweep / "11", ["stage=ppo", "adapter.r=64"], {"params/total": 10},
              [{"step": s, "env/reward_mean": 0.1 * s} for s in range(1, 6)], status="running")
    (sweep / "0" / "checkpoints" / "step-1").mkdir(parents=True)  # not a run
    (sweep / "0" / "checkpoints" / "step-1" / "summary.json").write_text("{}")
    assert compare.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:6]]
    assert rows == [["10", "ok", "-", "32", "0.9", "-"], ["0", "ok", "2", "8", "0.8", "2"],
                    ["1", "FAILED", "-", "0", "-", "-"], ["11", "incomplete", "5", "64", "-", "-"]]
    assert "1: ConfigError: adapter.r=0 must be > 0" in out

    compare.main([str(sweep), "--format", "csv", "--metrics", "eval/after/oracle_score", "--sort", "none"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["status"], r["eval/after/oracle_score"]) for r in table] == [
        ("ok", "0.8"), ("FAILED", ""), ("ok", "0.9"), ("incomplete", "")]
    png = compare.plot_curves(compare.load_runs([sweep]), tmp_path / "ppo.png")
    assert png.stat().st_size > 0


def test_columns_are_the_effective_config_values_that_differ(tmp_path, capsys):
    """fp32 is the default: no override says so, the effective config does. Where a run logs, and
    stage.resume, are never a difference."""
    _fake_run(tmp_path / "a", ["stage=ppo"], {"eval/after/oracle_score": 0.8})
    _fake_run(tmp_path / "b", ["stage=ppo", "quant=4bit", "logger=none"], {"eval/after/oracle_score": 0.7})
    _fake_run(tmp_path / "c", ["stage=ppo", "quant=4bit", "quant.bnb_4bit_quant_type=fp4", "stage.resume=auto"],
              {"eval/after/oracle_score": 0.6})
    runs = compare.load_runs([tmp_path])
    assert compare.differing_keys(runs) == ["quant.mode", "quant.bnb_4bit_quant_type"]
    compare.main([str(tmp_path), "--metrics", "eval/after/oracle_score"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "status", "step", "quant.mode", "quant.bnb_4bit_quant_type",
                                "eval/after/oracle_score"]
    assert [line.split()[3:5] for line in lines[2:]] == [["fp32", "nf4"], ["4bit", "nf4"], ["4bit", "fp4"]]
    import matplotlib.pyplot as plt

    figure = compare.draw_curves(runs)  # no curves logged: a figure that says so
    assert [t.get_text() for t in figure.axes[0].texts] == ["no learning curves in metrics.jsonl"]
    plt.close(figure)


def test_sort_puts_the_best_first_and_missing_values_last(tmp_path):
    for name, score, kl in (("a", 0.5, 3.0), ("b", 0.9, 9.0), ("c", None, 1.0), ("d", 0.7, None)):
        summary = {k: v for k, v in (("eval/after/oracle_score", score), ("eval/after/kl", kl)) if v is not None}
        _fake_run(tmp_path / name, ["stage=ppo", f"seed={ord(name)}"], summary)
    runs = compare.load_runs([tmp_path])
    order = lambda metric: [row[0] for row in compare.build_table(runs, [metric], sort=metric)[1]]  # noqa: E731
    assert order("eval/after/oracle_score") == ["b", "d", "a", "c"]  # higher is better
    assert order("eval/after/kl") == ["c", "a", "b", "d"]  # lower is better
    assert [row[0] for row in compare.build_table(runs, ["eval/after/kl"], sort="none")[1]] == ["a", "b", "c", "d"]


SEEDS_SCORES = {("8", 0): 0.80, ("8", 1): 0.86, ("8", 2): 0.83, ("32", 0): 0.70, ("32", 1): 0.90, ("32", 2): 0.77}


def _seed_sweep(root: Path) -> Path:
    """Two ranks x three seeds, each with a reward curve and three evaluations."""
    for job, ((rank, seed), score) in enumerate(SEEDS_SCORES.items()):
        metrics = [{"step": s, "env/reward_mean": score * s + 0.1 * seed} for s in range(1, 11)]
        metrics += [{"step": s, f"eval/{tag}/oracle_score": score * s / 10} for s, tag in
                    ((0, "before"), (5, "during"), (10, "after"))]
        _fake_run(root / str(job), ["stage=ppo", f"adapter.r={rank}", f"seed={seed}"],
                  {"eval/after/oracle_score": score, "eval/after/kl": 1.0 + seed},
                  sorted(metrics, key=lambda m: m["step"]))
    return root


def test_group_averages_the_seeds_of_each_setting(tmp_path, capsys):
    sweep = _seed_sweep(tmp_path / "sweep")
    header, rows = compare.build_table(compare.load_runs([sweep]), ["eval/after/oracle_score", "eval/after/kl"],
                                       group=True)
    assert header == ["run", "status", "n", "adapter.r", "eval/after/oracle_score", "eval/after/kl"]
    expected = {rank: [score for (r, _), score in SEEDS_SCORES.items() if r == rank] for rank in ("8", "32")}
    assert [row[3] for row in rows] == [8, 32]  # sorted by mean score: 0.83 before 0.79
    for row in rows:
        scores = expected[str(row[3])]
        assert row[1:3] == ["ok", 3]
        assert row[4].mean == pytest.approx(statistics.fmean(scores))
        assert row[4].std == pytest.approx(statistics.stdev(scores))
        assert (row[5].mean, row[5].std) == (pytest.approx(2.0), pytest.approx(1.0))
    compare.main([str(sweep), "--group", "--format", "csv", "--metrics", "eval/after/oracle_score"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["adapter.r"], r["n"]) for r in table] == [("8", "3"), ("32", "3")]
    assert float(table[1]["eval/after/oracle_score std"]) == pytest.approx(statistics.stdev(expected["32"]))
    compare.main([str(sweep), "--group", "--metrics", "eval/after/oracle_score"])
    assert "0.83 ± 0.03" in capsys.readouterr().out


def test_ema_matches_a_hand_computation():
    # w = 0.5: 1 → 1; (0.5·1 + 2)·0.5 / 0.75 = 5/3; (0.25·1 + 0.5·2 + 3)·0.5 / 0.875 = 17/7
    assert compare.ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7])
    assert compare.ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # no start-up bias
    assert compare.ema([1.0, 5.0], 0.0) == [1.0, 5.0]
    with pytest.raises(ValueError, match="must be in"):
        compare.ema([1.0], 1.0)


def test_curves_smoothed_grouped_with_bands_and_evaluations_as_markers(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    runs = compare.load_runs([_seed_sweep(tmp_path / "sweep")])
    figure = compare.draw_curves(runs, smooth=0.6, group=True)
    reward, oracle = figure.axes
    assert reward.get_title().startswith("reward") and oracle.get_title().startswith("oracle")
    faint = [line for line in reward.lines if line.get_alpha() == 0.25]
    bold = [line for line in reward.lines if line.get_linewidth() == 2]
    assert len(faint) == len(bold) == 2  # per setting: the raw mean, faint, and its EMA, bold
    assert len([c for c in reward.collections if isinstance(c, PolyCollection)]) == 2  # ± std bands
    rank8 = [run for run in runs if run.config["adapter.r"] == 8]
    raw = [statistics.fmean(dict(compare._curve(r, compare.CURVES[0].pattern))[s] for r in rank8)
           for s in range(1, 11)]
    (faint8,) = [line for line in faint if line.get_color() == bold[0].get_color()]
    assert list(faint8.get_ydata()) == pytest.approx(raw)
    assert list(bold[0].get_ydata()) == pytest.approx(compare.ema(raw, 0.6))
    assert {t.get_text() for t in reward.get_legend().get_texts()} == {"adapter.r=8 (n=3)", "adapter.r=32 (n=3)"}
    # Evaluations (3 points per run): markers, not smoothed.
    markers = [line for line in oracle.lines if line.get_marker() == "o"]
    assert len(markers) == 2 and all(list(line.get_xdata()) == [0, 5, 10] for line in markers)
    assert list(markers[0].get_ydata()) == pytest.approx(
        [statistics.fmean(s * score / 10 for (r, _), score in SEEDS_SCORES.items() if r == "8") for s in (0, 5, 10)])
    plt.close(figure)
    out = tmp_path / "p.png"
    assert compare.main([str(tmp_path / "sweep"), "--group", "--smooth", "0.6", "--plot", str(out)]) == 0
    assert out.stat().st_size > 0
    assert compare.main([str(tmp_path / "sweep"), "--smooth", "1.5"]) == 2


def test_no_runs_is_an_error(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing")]) == 2
