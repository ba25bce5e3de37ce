"""``marl-exp compare``: tables and learning curves from run dirs, on a real (tiny) rank sweep."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from marl_exp import compare

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


def _fake_run(path: Path, overrides: list[str], summary: dict | None, metrics=(), failed: str | None = None):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if failed:
        (path / "FAILED").write_text(failed + "\n\nTraceback ...\n")
    return path


# ------------------------------------------------------------------------------------------ real sweep
@pytest.mark.slow
def test_compare_a_rank_sweep_table(rank_sweep, capsys):
    assert compare.main([str(rank_sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "status", "adapter.r"]  # only the override that differs
    assert "eval/loss" in header and "time/total_s" in header
    assert "stage=sft" not in lines[0] and "logger" not in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "ok", "2"), ("1", "ok", "8")]


@pytest.mark.slow
def test_compare_markdown_and_csv_parse(rank_sweep, capsys):
    compare.main([str(rank_sweep), "--format", "csv"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["adapter.r"] for row in table] == ["2", "8"]
    summaries = [json.loads((rank_sweep / n / "summary.json").read_text()) for n in ("0", "1")]
    assert [float(row["eval/loss"]) for row in table] == [s["eval/loss"] for s in summaries]

    compare.main([str(rank_sweep), "--format", "markdown", "--metrics", "eval/loss,eval/perplexity"])
    lines = capsys.readouterr().out.strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == ["run", "status", "adapter.r", "eval/loss", "eval/perplexity"]
    assert set(lines[1]) <= set("|-:")
    assert [row[2] for row in cells[2:]] == ["2", "8"]
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
    assert all(compare._curve(r, compare.CURVES[3][1]) for r in runs)  # train/loss was logged per step


@pytest.mark.slow
def test_a_run_dir_and_the_multirun_dir_above_it(rank_sweep):
    assert [r.path.name for r in compare.load_runs([rank_sweep.parent.parent])] == ["0", "1"]
    (single,) = compare.load_runs([rank_sweep / "1"])
    assert single.summary and not single.failed
    assert compare.differing_overrides([single]) == list(single.overrides)  # one run: all of them


# ------------------------------------------------------------------------------------------ fake runs
def test_failed_runs_show_as_failed_rows(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", ["stage=ppo", "adapter.r=8"], {"eval/after/oracle_score": 0.8, "eval/after/kl": 2.0},
              [{"step": 1, "env/reward_mean": 0.1, "objective/kl": 0.0},
               {"step": 2, "env/reward_mean": 0.5, "objective/kl": 1.0, "eval/during/oracle_score": 0.7}])
    _fake_run(sweep / "1", ["stage=ppo", "adapter.r=0"], None, failed="ConfigError: adapter.r=0 must be > 0")
    _fake_run(sweep / "10", ["stage=ppo", "adapter.r=32"], {"eval/after/oracle_score": 0.9})
    (sweep / "0" / "checkpoints" / "step-1").mkdir(parents=True)  # not a run
    (sweep / "0" / "checkpoints" / "step-1" / "summary.json").write_text("{}")
    assert compare.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:5]]
    assert rows == [["0", "ok", "8", "0.8", "2"], ["1", "FAILED", "0", "-", "-"], ["10", "ok", "32", "0.9", "-"]]
    assert "1: ConfigError: adapter.r=0 must be > 0" in out

    compare.main([str(sweep), "--format", "csv", "--metrics", "eval/after/oracle_score"])
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["status"], r["eval/after/oracle_score"]) for r in table] == [("ok", "0.8"), ("FAILED", ""),
                                                                             ("ok", "0.9")]
    png = compare.plot_curves(compare.load_runs([sweep]), tmp_path / "ppo.png")
    assert png.stat().st_size > 0


def test_no_runs_is_an_error(tmp_path, capsys):
    assert compare.main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing")]) == 2
