"""Run tracking (metrics.jsonl, summary.json, W&B offline), the W&B mode rules and crash-safe writes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import QUICK, compose
from marl_exp import cli
from marl_exp.io import atomic_write_json, atomic_write_text, read_json
from marl_exp.run.tracking import Tracker, TrackerCallback, hf_to_metric_name, resolve_wandb_mode, wandb_has_credentials

QUICK_WANDB = tuple(o for o in QUICK if not o.startswith("logger=")) + ("logger=wandb",)




# ------------------------------------------------------------------------------------------ W&B mode
@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """No API key, no WANDB_MODE, and a HOME without a .netrc."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_auto_is_offline_without_credentials(no_wandb_credentials):
    assert not wandb_has_credentials()
    assert resolve_wandb_mode("auto") == "offline"


def test_auto_is_online_with_an_api_key(no_wandb_credentials, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"


def test_auto_is_online_with_a_netrc_entry(no_wandb_credentials, tmp_path):
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"


def test_configured_mode_is_used_when_not_auto(no_wandb_credentials, monkeypatch):
    assert resolve_wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("offline") == "offline"


@pytest.mark.parametrize("configured", ["auto", "online", "disabled"])
def test_explicit_wandb_mode_env_wins(no_wandb_credentials, monkeypatch, configured):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(configured) == "offline"


# ---------------------------------------------------------------------------------------------- io
def test_atomic_write_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "data.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, "x"], "p": tmp_path})
    assert read_json(path) == {"a": [1.5, "x"], "b": 1, "p": str(tmp_path)}
    assert sorted(os.listdir(path.parent)) == ["data.json"]
    # Same permissions as a file written with open().
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    assert (path.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


@pytest.mark.parametrize("bad", ["circular", "mixed_keys"])
def test_atomic_write_json_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path, bad):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"ok": 1})
    if bad == "circular":
        value: dict = {}
        value["self"] = value
    else:
        value = {1: "a", "b": 2}  # sort_keys cannot order int and str keys
    with pytest.raises((ValueError, TypeError)):
        atomic_write_json(path, value)
    assert read_json(path) == {"ok": 1}
    assert os.listdir(tmp_path) == ["summary.json"]


def test_atomic_write_text_failure_while_writing_leaves_no_temp(tmp_path):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, b"bytes are not text")  # fails inside the write
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


# ------------------------------------------------------------------------------------------ tracker
def test_tracker_writes_metrics_and_summary_locally(tmp_path):
    cfg = compose("logger=none")
    with Tracker(cfg, tmp_path / "run", job_type="test") as tracker:
        assert tracker.wandb_run is None
        tracker.log({"train/loss": torch.tensor(1.5), "eval/x": float("nan")}, step=1)
        tracker.log({"train/loss": 0.5, "vec": torch.tensor([1.0, 2.0])}, step=2)
        tracker.update_summary({"eval/loss": torch.tensor(0.25)})
        tracker.update_summary({"time/total_s": 3.0})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [{"step": 1, "train/loss": 1.5, "eval/x": "nan"},
                       {"step": 2, "train/loss": 0.5, "vec": [1.0, 2.0]}]
    summary = read_json(tmp_path / "run" / "summary.json")
    (segment,) = summary.pop("segments")  # marl_exp.run.records: one process, finished
    assert summary == {"eval/loss": 0.25, "time/total_s": 3.0}
    assert segment["status"] == "finished" and segment["last_step"] == 2 and segment["seconds"] > 0
    assert segment["pid"] == os.getpid() and segment["wandb"] is None


def test_a_stage_that_stops_before_its_summary_leaves_none(tmp_path):
    """SFT and reward write summary.json last (the stage cache's mark of a complete entry): a tracker that
    ends without one, e.g. on an interrupt, must not write one."""
    with pytest.raises(RuntimeError):
        with Tracker(compose("stage=sft", "logger=none"), tmp_path, job_type="sft") as tracker:
            tracker.log({"train/loss": 1.0}, step=1)
            raise RuntimeError("stopped")
    assert not (tmp_path / "summary.json").exists()


def test_hf_metric_names():
    assert hf_to_metric_name("loss") == "train/loss"
    assert hf_to_metric_name("learning_rate") == "train/learning_rate"
    assert hf_to_metric_name("eval_loss") == "eval/loss"
    assert hf_to_metric_name("eval_accuracy") == "eval/accuracy"
    assert hf_to_metric_name("mean_token_accuracy") == "train/mean_token_accuracy"


def test_tracker_callback_forwards_trainer_logs(tmp_path):
    from types import SimpleNamespace

    tracker = Tracker(compose("logger=none"), tmp_path, job_type="test")
    callback = TrackerCallback(tracker)
    state = SimpleNamespace(is_world_process_zero=True, global_step=7)
    callback.on_log(None, state, None, logs={"loss": 2.0, "eval_loss": 1.0})
    callback.on_log(None, SimpleNamespace(is_world_process_zero=False, global_step=8), None, logs={"loss": 1.0})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 7, "train/loss": 2.0, "eval/loss": 1.0}]


# ------------------------------------------------------------------------------- W&B names in a sweep
def _sweep_job(tmp_path, job_overrides: list[str], sweep_overrides: list[str] | None, num: int = 3):
    """A multirun job's Hydra config; its sweep dir holds a multirun.yaml with ``sweep_overrides`` (the
    command line, comma lists and all), as Hydra's basic sweeper writes it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from conftest import CONF_DIR
    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=job_overrides, return_hydra_config=True)
    sweep_dir = tmp_path / "multirun" / "2026-01-31" / "12-00-00_ppo"
    sweep_dir.mkdir(parents=True)
    if sweep_overrides is not None:
        OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": sweep_overrides},
                                                   "sweeper": {"params": None}}}), sweep_dir / "multirun.yaml")
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(sweep_dir)
        cfg.hydra.job.num = num
        cfg.hydra.job.override_dirname = ",".join(sorted(job_overrides))
    return cfg


@pytest.mark.parametrize("sweep,group,name,swept", [
    (["adapter.r=8,16", "seed=0,1,2", "stage=ppo"], "2026-01-31_12-00-00_ppo:adapter.r=16", "3:adapter.r=16,seed=1",
     {"adapter.r": "16", "seed": "1"}),
    (["seed=0,1,2", "adapter.r=16", "stage=ppo"], "2026-01-31_12-00-00_ppo", "3:seed=1", {"seed": "1"}),
    (None, "2026-01-31_12-00-00_ppo", "3:adapter.r=16,seed=1,stage=ppo", None),  # no multirun.yaml: overrides
])
def test_wandb_group_and_name_of_a_sweep_job_carry_the_swept_keys(tmp_path, sweep, group, name, swept):
    """Seeds of one setting share a W&B group, so the dashboard averages them as `compare --group` does."""
    from hydra.core.hydra_config import HydraConfig

    from marl_exp.run.tracking import wandb_identity

    cfg = _sweep_job(tmp_path, ["adapter.r=16", "seed=1", "stage=ppo"], sweep)
    HydraConfig.instance().set_config(cfg)
    try:
        got_group, got_name, info = wandb_identity(cfg, tmp_path / "run")
    finally:
        HydraConfig.instance().cfg = None
    assert (got_group, got_name, info.get("swept")) == (group, name, swept)


# ------------------------------------------------------------------------------------- W&B offline
def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_wandb_offline_run_of_a_real_stage(tmp_path):
    import wandb

    from marl_exp.stages.pipeline import run_stage

    assert os.environ["WANDB_MODE"] == "offline"
    cfg = compose("stage=sft", *QUICK_WANDB, "stage.logging_steps=1", f"output_dir={tmp_path}")
    run_dir = tmp_path / "run"
    summary = run_stage(cfg, run_dir)
    assert wandb.run is None  # finished
    (offline,) = offline_runs(run_dir)
    assert list(offline.glob("*.wandb")), "no offline run data written"
    # The TRL trainer's logs reached metrics.jsonl through our callback, one JSON object per line.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["step"], int) for r in records)
    losses = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3]
    assert all(math.isfinite(r["train/loss"]) and "train/learning_rate" in r for r in losses)
    assert any("eval/loss" in r for r in records)
    assert read_json(run_dir / "summary.json")["eval/loss"] == pytest.approx(summary["eval/loss"])


@pytest.mark.slow
def test_wandb_run_is_finished_when_the_stage_raises(tmp_path, monkeypatch):
    import wandb

    from marl_exp.stages import sft

    def boom(cfg, run_dir, tracker):
        tracker.log({"train/loss": 1.0}, step=1)
        raise RuntimeError("boom in the stage")

    monkeypatch.setattr(sft, "run", boom)
    cfg = compose("stage=sft", *QUICK_WANDB, f"output_dir={tmp_path}")
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom in the stage"):
        cli.main(cfg, run_dir=run_dir)
    assert wandb.run is None
    assert offline_runs(run_dir)
    failed = (run_dir / "FAILED").read_text()
    assert failed.startswith("RuntimeError: boom in the stage") and "Traceback" in failed
    assert not (run_dir / "summary.json").exists()


def test_cli_main_reports_bad_config_in_one_line(tmp_path, capsys):
    cfg = compose("logger=none", "stage=reward", "stage.sft_model=/no/such/dir", f"output_dir={tmp_path}")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg, run_dir=tmp_path / "run")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("marl-exp: error: stage.sft_model=")
    assert (tmp_path / "run" / "FAILED").exists()
