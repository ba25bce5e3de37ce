"""Sweeps: presets, launcher/sweeper configs, a failing job in a multirun, W&B grouping, reruns from .hydra/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from conftest import CONF_DIR, REPO, compose

# Tiny SFT jobs: the sweep tests check plumbing (a few seconds per job).
TINY = ("logger=none", "stage=sft", "stage.max_steps=2", "stage.batch_size=8", "stage.eval_batch_size=8",
        "data.num_sft_train=32", "data.num_sft_eval=8")


def compose_with_hydra(*overrides: str):
    from hydra import compose, initialize_config_dir

    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("HYDRA_FULL_ERROR", None)  # the sweep report, not a traceback
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_dirs(output_dir: Path) -> list[Path]:
    sweeps = sorted((output_dir / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sorted((p for p in sweeps[0].iterdir() if p.is_dir()), key=lambda p: int(p.name))


# ------------------------------------------------------------------------------------- presets, configs
@pytest.mark.parametrize("preset, params", [
    ("lora_rank", {"adapter.r": "8,16,32"}),
    ("rank_x_quant", {"adapter.r": "8,16,32", "quant": "fp32,8bit,4bit"}),
    ("kl_coef", {"stage": "ppo", "stage.kl.init_kl_coef": "0.05,0.1,0.2"}),
])
def test_sweep_presets_set_the_sweeper_params(preset, params):
    cfg = compose_with_hydra(f"+sweep={preset}")
    assert {k: str(v) for k, v in cfg.hydra.sweeper.params.items()} == params
    assert "sweep" not in cfg  # a global package: it adds nothing to the job config


def test_every_sweep_point_of_the_presets_composes():
    """The values the presets sweep over are valid choices/keys (a typo would fail only at sweep time)."""
    for quant in ("fp32", "8bit", "4bit"):
        for r in (8, 16, 32):
            cfg = compose_with_hydra(f"quant={quant}", f"adapter.r={r}")
            assert cfg.quant.mode == quant and cfg.adapter.r == r
    for coef in (0.05, 0.1, 0.2):
        assert compose_with_hydra("stage=ppo", f"stage.kl.init_kl_coef={coef}").stage.kl.init_kl_coef == coef


def test_wandb_sweep_file_runs_train_py_with_hydra_overrides():
    spec = yaml.safe_load((REPO / "sweeps" / "wandb_lora_rank.yaml").read_text())
    assert spec["program"] == "train.py"
    assert "${args_no_hyphens}" in spec["command"]
    assert spec["metric"] == {"name": "eval/after/oracle_strict", "goal": "maximize"}
    assert spec["parameters"]["adapter.r"]["values"] == [8, 16, 32]
    for key in spec["parameters"]:  # every swept key exists in the config
        assert OmegaConf.select(compose_with_hydra("stage=ppo"), key) is not None


def test_local_parallel_launcher_config():
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    launcher = compose_with_hydra("hydra/launcher=local_parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    launcher = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.partition == "gpu"
    for key in ("gpus_per_node", "timeout_min", "cpus_per_task", "mem_gb"):
        assert isinstance(launcher[key], int) and launcher[key] > 0, key


def test_optuna_sweeper_config_composes_and_instantiates():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.utils import instantiate

    sweeper = compose_with_hydra("hydra/sweeper=optuna_search").hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.n_trials > 0
    assert set(sweeper.params) == {"adapter.r", "stage.optim.learning_rate"}
    assert instantiate(sweeper).sweeper.n_trials == sweeper.n_trials  # the plugin accepts it


def test_sweep_report_callback_is_registered():
    callbacks = compose_with_hydra().hydra.callbacks
    assert callbacks.sweep_report._target_ == "marl_exp.run.hydra_callbacks.SweepReport"


# ------------------------------------------------------------------------------- failure in a multirun
@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("failing_sweep")
    result = train("-m", *TINY, "adapter.r=4,0,8", f"output_dir={out}")
    return out, result


@pytest.mark.slow
def test_a_failing_job_does_not_sink_the_sweep(failing_sweep):
    out, result = failing_sweep
    jobs = job_dirs(out)
    assert [p.name for p in jobs] == ["0", "1", "2"], result.stderr[-2000:]
    assert (jobs[0] / "summary.json").exists() and (jobs[2] / "summary.json").exists(), result.stderr[-2000:]
    assert not (jobs[1] / "summary.json").exists()
    assert "adapter.r=0 must be > 0" in (jobs[1] / "FAILED").read_text()
    # The end of the sweep lists the failed job with its first error line, and the exit code says so.
    assert result.returncode == 1
    report = result.stderr[result.stderr.index("sweep finished with 1 failed job"):]
    assert f"FAILED {jobs[1]}" in report
    assert "ConfigError: adapter.r=0 must be > 0" in report
    summary = json.loads((jobs[0].parent / "sweep_summary.json").read_text())
    assert summary["failed"] == 1 and summary["completed_summaries"] == 2
    assert [job["failed"] for job in summary["jobs"]] == [False, True, False]


def test_cli_main_returns_none_after_a_failure_in_multirun_mode(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from marl_exp import cli

    cfg = compose_with_hydra(*TINY, "adapter.r=0")
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    try:
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        assert cli.main(task_cfg, run_dir=tmp_path) is None  # no SystemExit: the sweep goes on
    finally:
        HydraConfig.instance().cfg = None
    assert (tmp_path / "FAILED").exists()
    with pytest.raises(SystemExit):  # a single run still exits 2
        cli.main(compose(*TINY, "adapter.r=0"), run_dir=tmp_path / "single")


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    result = train("-m", "hydra/launcher=local_parallel", *TINY, "adapter.r=4,8", f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 2
    for job, rank in zip(jobs, (4, 8)):
        assert json.loads((job / "summary.json").read_text())["eval/loss"] > 0
        assert f"adapter.r={rank}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert "Joblib" in result.stderr + result.stdout
    assert "none failed" in result.stdout


# ------------------------------------------------------------------------------------ W&B in a sweep
class FakeRun:
    dir = "/tmp/fake-wandb/files"

    def __init__(self):
        self.summary = {}

    def finish(self, exit_code=0):
        pass


def _tracker_init_kwargs(monkeypatch, tmp_path, cfg) -> dict:
    import wandb

    from marl_exp.run.tracking import Tracker

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    with Tracker(task_cfg, tmp_path / "run", job_type="ppo"):
        pass
    return seen


def _as_multirun_job(cfg, sweep_dir: str, num: int):
    from hydra.types import RunMode

    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = sweep_dir
        cfg.hydra.job.num = num
    return cfg


def test_each_sweep_job_is_a_wandb_run_in_the_sweeps_group(monkeypatch, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = _as_multirun_job(compose_with_hydra("logger=wandb", "adapter.r=8", "stage=ppo"),
                           "outputs/multirun/2025-01-31/12-00-00_ppo", 2)
    HydraConfig.instance().set_config(cfg)
    try:
        seen = _tracker_init_kwargs(monkeypatch, tmp_path, cfg)
        with open_dict(cfg):
            cfg.logger.group = "my-sweep"
        explicit = _tracker_init_kwargs(monkeypatch, tmp_path, cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert seen["group"] == "2025-01-31_12-00-00_ppo"
    assert seen["job_type"] == "ppo"
    assert seen["name"] == "2:adapter.r=8,logger=wandb,stage=ppo"
    assert seen["config"]["hydra"]["overrides"] == ["logger=wandb", "adapter.r=8", "stage=ppo"]
    assert seen["config"]["adapter"]["r"] == 8
    assert explicit["group"] == "my-sweep"  # logger.group wins


def test_a_single_run_keeps_its_group_and_name(monkeypatch, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_with_hydra("logger=wandb", "adapter.r=8")
    HydraConfig.instance().set_config(cfg)
    try:
        seen = _tracker_init_kwargs(monkeypatch, tmp_path, cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert seen["group"] is None and seen["name"] == "run"
    assert seen["config"]["hydra"]["multirun"] is False


# -------------------------------------------------------------------------------------- reproducibility
def test_run_record_has_the_git_commit_or_null(tmp_path):
    from marl_exp.stages.common import environment_record, git_record

    record = environment_record()
    assert "git" in record
    if record["git"] is not None:
        assert re.fullmatch(r"[0-9a-f]{40}", record["git"]["commit"])
        assert isinstance(record["git"]["dirty"], bool)
    assert git_record(tmp_path) is None  # not a checkout


@pytest.mark.slow
def test_a_run_reruns_from_its_saved_hydra_dir(failing_sweep, tmp_path):
    out, _ = failing_sweep
    run = job_dirs(out)[0]
    record = json.loads((run / "run_record.json").read_text())
    assert {"git", "packages", "python"} <= set(record)
    assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
    # The exact config, replayed: --config-path (not --config-dir, which ranks below conf/).
    rerun = tmp_path / "rerun"
    result = train("--config-path", str(run / ".hydra"), "--config-name", "config", f"hydra.run.dir={rerun}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (rerun / "resolved_config.yaml").read_text() == (run / "resolved_config.yaml").read_text()
    before = json.loads((run / "summary.json").read_text())
    after = json.loads((rerun / "summary.json").read_text())
    assert after["eval/loss"] == pytest.approx(before["eval/loss"], rel=1e-5)


@pytest.mark.parametrize("argv,label", [
    (["-m", "stage=grpo,rloo,ppo"], "grpo-rloo-ppo"),
    (["--multirun", "debug=rl", "stage=ppo, grpo"], "ppo-grpo"),
    (["-m", "stage=glob(*)"], "stages"),
    (["-m", "stage=grpo", "seed=0,1"], None),  # one stage: the dir is named after it, as before
    (["stage=grpo,rloo"], None),  # not a multirun (Hydra refuses the list itself)
    (["-m", "stage.sampling.top_k=0,5"], None),
])
def test_a_sweep_over_stages_gets_one_sweep_dir_label(argv, label):
    from marl_exp.config import swept_stages

    assert swept_stages(argv) == label


def test_the_sweep_dir_label_is_the_swept_stages_else_the_stage(monkeypatch):
    from marl_exp.config import SWEEP_LABEL_ENV, sweep_label

    monkeypatch.delenv(SWEEP_LABEL_ENV, raising=False)
    assert sweep_label("ppo") == "ppo"
    monkeypatch.setenv(SWEEP_LABEL_ENV, "grpo-rloo")
    assert sweep_label("ppo") == sweep_label("grpo") == "grpo-rloo"  # every job of the sweep: the same dir


def test_a_sweep_label_from_a_parent_process_is_not_inherited(monkeypatch):
    from marl_exp import cli, config
    from marl_exp.config import SWEEP_LABEL_ENV

    monkeypatch.setenv(SWEEP_LABEL_ENV, "grpo-rloo")  # as inside a job of a stage sweep
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "seed=0,1"])
    monkeypatch.setattr(config, "register_configs", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit):  # stop before Hydra starts: the label is decided first
        cli.run_app(REPO / "conf")
    assert SWEEP_LABEL_ENV not in os.environ
