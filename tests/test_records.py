"""Records of interrupted runs: one W&B run per training, each step once, segments, overrides, status.

The end-to-end check is real: a tiny PPO run (``debug=ppo``, W&B offline) is killed with SIGKILL between
two checkpoints, then resumed as a user would after a crash, with ``stage.resume=auto`` and no run dir.
The W&B side is read from the offline run files (``wandb_files``) and synced with the printed
``wandb sync`` command to a stub W&B server that keeps the run's history rows and summary.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose
from marl_exp import compare
from marl_exp.config import ConfigError
from marl_exp.run import records
from marl_exp.run.tracking import SegmentRun, Tracker, wandb_history_steps
from wandb_files import StubWandbServer, killed_wandb_file_records, wandb_file_records

# 12 PPO steps, a checkpoint and an evaluation every 4; SFT and reward built into the stage cache first.
KILLED_RUN = ("debug=ppo", "stage.steps=12", "stage.save_every=4", "stage.eval.eval_every=4", "logger=wandb")
# Recomputed after a resume to the same values; only timings differ.
TIMING = ("time/", "perf/")


def read_rows(run_dir: Path) -> list[dict]:
    return records.read_metrics(run_dir)


def stats_steps(rows: list[dict]) -> list[int]:
    return [row["step"] for row in rows if "ppo/loss/total" in row]


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("killed") / "out"
    run_dir = out / "runs" / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_DATA_DIR": str(out.parent / "wandb-data")}
    env.pop("HYDRA_FULL_ERROR", None)
    # An earlier test's in-process W&B run exported WANDB_SERVICE: a child would join that service, which keeps
    # the killed run registered ("run ID is in use"). A user's shell has no such service; neither do these runs.
    env.pop("WANDB_SERVICE", None)
    command = [sys.executable, "train.py", *KILLED_RUN, f"output_dir={out}"]
    out.mkdir(parents=True)
    with open(out.parent / "first.log", "w") as log_file:
        first = subprocess.Popen([*command, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env, stdout=log_file,
                                 stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not any(step >= 6 for step in stats_steps(read_rows(run_dir))):
            assert first.poll() is None, (out.parent / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no PPO step 6 in time"
            time.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    killed_at = time.time()
    killed = {"rows": read_rows(run_dir), "summary": records.read_summary(run_dir),
              "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")),
              "compare": compare.load_run(run_dir), "log": (out.parent / "first.log").read_text()}
    time.sleep(1.0)  # wandb names an offline run dir by the second it starts
    resumed = subprocess.run([*command, "stage.resume=auto"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "run_dir": run_dir, "killed": killed, "killed_at": killed_at,
            "log": resumed.stdout + resumed.stderr}


@pytest.mark.slow
def test_the_kill_came_between_two_checkpoints_and_compare_showed_the_run_incomplete(killed_then_resumed):
    killed = killed_then_resumed["killed"]
    assert killed["checkpoints"] == ["step-000004"]  # the next one (step 8) was never written
    last = max(stats_steps(killed["rows"]))
    assert 6 <= last < 8
    run = killed["compare"]
    assert (run.status, run.last_step) == ("incomplete", last)  # not "ok": the summary was written at the start
    assert killed["summary"]["segments"][0]["status"] == "running"  # what the dead process left

    after = compare.load_run(killed_then_resumed["run_dir"])
    assert (after.status, after.last_step) == ("ok", 12)


@pytest.mark.slow
def test_metrics_jsonl_holds_each_step_once_and_the_cut_steps_were_recomputed_alike(killed_then_resumed):
    rows = read_rows(killed_then_resumed["run_dir"])
    assert stats_steps(rows) == list(range(1, 13))
    assert [row["step"] for row in rows if any(k.startswith("eval/") for k in row)] == [0, 4, 8, 12]
    assert [row["step"] for row in rows] == sorted(row["step"] for row in rows)
    # The killed process had logged steps 5.. before it died; the resume cut them and computed them again.
    before = {row["step"]: row for row in killed_then_resumed["killed"]["rows"] if "ppo/loss/total" in row}
    after = {row["step"]: row for row in rows if "ppo/loss/total" in row}
    cut = [step for step in before if step > 4]
    assert cut and all(
        {k: v for k, v in before[s].items() if not k.startswith(TIMING)} ==
        {k: v for k, v in after[s].items() if not k.startswith(TIMING)} for s in cut)
    assert "metrics.jsonl cut back to step 4" in killed_then_resumed["log"]


@pytest.mark.slow
def test_summary_records_each_segment_and_the_total_time(killed_then_resumed):
    run_dir, out = killed_then_resumed["run_dir"], killed_then_resumed["out"]
    summary = records.read_summary(run_dir)
    first, second = summary["segments"]
    original = [*KILLED_RUN, f"output_dir={out}"]
    assert first["status"] == "killed" and first["overrides"] == original
    assert first["resumed_from_step"] is None
    assert first["last_step"] == max(stats_steps(killed_then_resumed["killed"]["rows"]))
    # It ended at the last write the dead process left, before the kill.
    ended = records._parse_time(first["ended_at"])
    assert records._parse_time(first["started_at"]) < ended <= killed_then_resumed["killed_at"]
    assert first["seconds"] == pytest.approx(ended - records._parse_time(first["started_at"]), abs=1e-3)
    assert second["status"] == "finished" and second["overrides"] == [*original, "stage.resume=auto"]
    assert (second["resumed_from_step"], second["last_step"]) == (4, 12)
    # time/total_s adds both segments (written just before the second one ended).
    both = first["seconds"] + second["seconds"]
    assert both - 2.0 < summary["time/total_s"] <= both
    assert "train/interrupted_at_step" not in summary and summary["train/steps"] == 12


@pytest.mark.slow
def test_the_original_overrides_are_kept_and_the_resumes_recorded_beside_them(killed_then_resumed):
    run_dir, out = killed_then_resumed["run_dir"], killed_then_resumed["out"]
    hydra = run_dir / ".hydra"
    original = [*KILLED_RUN, f"output_dir={out}"]
    assert yaml.safe_load((hydra / "overrides.yaml").read_text()) == original
    assert yaml.safe_load((hydra / "overrides.resume-1.yaml").read_text()) == [*original, "stage.resume=auto"]
    assert yaml.safe_load((hydra / "config.yaml").read_text())["stage"]["resume"] is None
    assert yaml.safe_load((hydra / "config.resume-1.yaml").read_text())["stage"]["resume"] == "auto"
    assert yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["stage"]["resume"] is None
    assert yaml.safe_load((run_dir / "resolved_config.resume-1.yaml").read_text())["stage"]["resume"] == "auto"
    assert {"inputs", "packages", "git"} <= json.loads((run_dir / "run_record.resume-1.json").read_text()).keys()
    # stage.resume=auto without a run dir found the killed run; the empty dir Hydra made for it is gone.
    assert f"stage.resume=auto: resuming {run_dir}" in killed_then_resumed["log"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["killed"]


@pytest.mark.slow
def test_one_wandb_run_whose_steps_continue_without_gaps_or_repeats(killed_then_resumed, tmp_path):
    run_dir = killed_then_resumed["run_dir"]
    segments = records.read_summary(run_dir)["segments"]
    dirs = [run_dir / s["wandb"]["dir"] for s in segments]
    run_id = segments[0]["wandb"]["id"]
    assert len(set(dirs)) == 2 and {s["wandb"]["id"] for s in segments} == {run_id}
    files = [next(d.glob(f"run-{run_id}.wandb")) for d in dirs]
    killed_records = killed_wandb_file_records(files[0])
    resumed_records = wandb_file_records(files[1])
    (run_record,) = [r.run for r in resumed_records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == run_id and run_record.resume  # a resume of the same W&B run
    steps = [[r.history.step.num for r in recs if r.WhichOneof("record_type") == "history"]
             for recs in (killed_records, resumed_records)]
    assert steps[0] + steps[1] == list(range(13)), steps  # each step once, in order, across both files
    assert [wandb_history_steps(f) for f in files] == steps  # the reader the resume used agrees

    # Upload both segments with the command the run printed, to a server that keeps the rows.
    (line,) = [l for l in killed_then_resumed["log"].splitlines() if "upload every segment of this run" in l]
    commands = [shlex.split(c) for c in line.split(" with: ", 1)[1].split(" && ")]
    assert commands == [["wandb", "sync", str(d)] for d in dirs]  # one after the other, in order
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "HOME": str(tmp_path)}
    with StubWandbServer() as server:
        env["WANDB_BASE_URL"] = server.url
        for command in commands:
            synced = subprocess.run([str(Path(sys.executable).parent / "wandb"), *command[1:]], env=env,
                                    cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert synced.returncode == 0, synced.stderr[-2000:]
    # The killed segment's file ends inside a record: wandb uploads what comes before and says so.
    history = server.runs[run_id]["history"]
    assert [row["_step"] for row in history] == list(range(13))
    local = {}
    for row in read_rows(run_dir):
        local.setdefault(row["step"], {}).update(row)
    for row in history:  # every value W&B holds is the one in metrics.jsonl (timings aside)
        values = {k: v for k, v in row.items() if not k.startswith(("_", *TIMING)) and not isinstance(v, dict)}
        assert values and values == {k: local[row["_step"]][k] for k in values}, row["_step"]
    summary, final = server.runs[run_id]["summary"], records.read_summary(run_dir)
    for key in ("eval/before/oracle_score", "eval/after/oracle_score", "params/trainable", "time/total_s"):
        assert summary[key] == pytest.approx(final[key]), key
    created = [v["artifactCollectionName"] for op, v, _ in server.operations if op == "CreateArtifact"]
    assert any(name.startswith("ppo-") and name.endswith("-policy") for name in created)


@pytest.mark.slow
def test_printed_wandb_sync_paths_of_cached_upstream_builds_exist(killed_then_resumed):
    out = killed_then_resumed["out"]
    paths = [Path(line.split("wandb sync ", 1)[1].strip()) for line in killed_then_resumed["killed"]["log"].splitlines()
             if "upload this run with: wandb sync" in line]
    stages = sorted(p.relative_to(out / "cache").parts[0].split("-")[0] for p in paths)
    assert stages == ["reward", "sft"]  # built into the cache, then renamed from their .building dirs
    assert all(p.is_dir() and list(p.glob("run-*.wandb")) for p in paths), paths


# ----------------------------------------------------------------------------------- W&B resume, fast
def _offline_tracker(run_dir: Path, *overrides: str) -> Tracker:
    return Tracker(compose("stage=ppo", "logger=wandb", *overrides), run_dir, job_type="ppo")


def _die(tracker: Tracker) -> None:
    """What a killed process leaves: the W&B file flushed, the segment still 'running'."""
    tracker.wandb_run.finish()
    tracker.wandb_run = None


@pytest.mark.parametrize("wandb_got", ["fewer", "more"])
def test_a_resume_sends_w_and_b_each_step_once(tmp_path, wandb_got):
    """The killed segment logged steps 0..6 locally; W&B got 0..2 of them (``fewer``: the rest died with the
    process) or all (``more``); the checkpoint is at step 4. The resume replays 3..4 from metrics.jsonl in
    the first case and skips the steps W&B holds in the second."""
    run_dir = tmp_path / "run"
    first = _offline_tracker(run_dir)
    for step in range(7):
        run = first.wandb_run
        if wandb_got == "fewer" and step > 2:
            first.wandb_run = None
        first.log({"x": float(step)}, step=step)
        first.wandb_run = run
    first.update_summary({"params/total": 10})
    _die(first)
    time.sleep(1.0)  # wandb names an offline run dir by the second it starts

    second = _offline_tracker(run_dir, "stage.resume=auto")
    assert second.resuming and second.segments.index == 1
    second.continue_from(4)
    for step in range(5, 9):
        second.log({"x": float(step)}, step=step)
    second.update_summary({"train/steps": 8})
    second.finish()

    summary = records.read_summary(run_dir)
    assert [s["status"] for s in summary["segments"]] == ["killed", "finished"]
    ids = {s["wandb"]["id"] for s in summary["segments"]}
    assert len(ids) == 1
    files = [next((run_dir / s["wandb"]["dir"]).glob("*.wandb")) for s in summary["segments"]]
    steps = [[r.history.step.num for r in wandb_file_records(f) if r.WhichOneof("record_type") == "history"]
             for f in files]
    assert steps == ([[0, 1, 2], [3, 4, 5, 6, 7, 8]] if wandb_got == "fewer" else [list(range(7)), [7, 8]])
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in wandb_file_records(files[1]) if r.WhichOneof("record_type") == "history"]
    assert [row["x"] for row in history] == [float(s) for s in steps[1]]
    assert [row["step"] for row in read_rows(run_dir)] == list(range(9))


def test_segment_run_drops_steps_below_the_first_new_one():
    sent = []

    class Run:
        offline = True

        def log(self, data, step=None, **kwargs):
            sent.append(step)

    run = SegmentRun(Run(), first_new_step=3)
    for step in (2, 3, 4):
        run.log({"x": 1}, step=step)
    run.log({"x": 1})  # no step: wandb's own counter
    assert sent == [3, 4, None] and run.offline is True


def test_wandb_history_steps_of_a_file_cut_short(tmp_path):
    run_dir = tmp_path / "run"
    tracker = _offline_tracker(run_dir)
    for step in range(40):
        tracker.log({"x": float(step), "text": "y" * 2000}, step=step)  # rows over more than one 32 KiB block
    tracker.finish()
    (path,) = run_dir.glob("wandb/offline-run-*/*.wandb")
    full = [r.history.step.num for r in wandb_file_records(path) if r.WhichOneof("record_type") == "history"]
    assert full == list(range(40)) and wandb_history_steps(path) == full
    data = path.read_bytes()
    assert len(data) > 2 * 32768
    previous = []
    for cut in range(0, len(data), 997):
        (tmp_path / "cut.wandb").write_bytes(data[:cut])
        steps = wandb_history_steps(tmp_path / "cut.wandb")
        assert steps == full[:len(steps)] and len(steps) >= len(previous)  # a prefix, growing with the file
        previous = steps


# --------------------------------------------------------------------------------- run-dir records
def test_cut_metrics_keeps_the_rows_up_to_the_step(tmp_path):
    lines = [json.dumps({"step": s, "x": s}) for s in (0, 1, 2, 2, 3, 4)] + ['{"step": 5, "x"']  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert records.cut_metrics(tmp_path, 2) == [3, 4]
    assert [r["step"] for r in read_rows(tmp_path)] == [0, 1, 2, 2]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    assert records.cut_metrics(tmp_path, 2) == []  # nothing more to cut
    assert records.cut_metrics(tmp_path, None) == [0, 1, 2, 2] and read_rows(tmp_path) == []
    assert records.cut_metrics(tmp_path / "none", 3) == []


def test_a_resume_writes_its_run_record_beside_the_original(tmp_path):
    cfg, resume = compose("stage=ppo"), compose("stage=ppo", "stage.resume=auto")
    original = ("resolved_config.yaml", "run_record.json")
    assert records.run_record_names(resume, tmp_path) == original  # a fresh dir: nothing to resume
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)  # a checkpoint copied in, no record
    assert records.is_resuming(resume, tmp_path) and records.run_record_names(resume, tmp_path) == original
    (tmp_path / "resolved_config.yaml").write_text("seed: 0\n")
    (tmp_path / "summary.json").write_text(json.dumps({"segments": [_segment("killed"), _segment("interrupted")]}))
    assert records.run_record_names(resume, tmp_path) == ("resolved_config.resume-2.yaml", "run_record.resume-2.json")
    assert not records.is_resuming(cfg, tmp_path) and records.run_record_names(cfg, tmp_path) == original


def _hydra_files(directory: Path, overrides: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (directory / "config.yaml").write_text(yaml.safe_dump({"seed": len(overrides)}))
    (directory / "hydra.yaml").write_text("hydra: {}\n")


def test_hydra_files_of_a_resume_go_beside_the_originals(tmp_path):
    run = tmp_path / "run"
    _hydra_files(run / ".hydra", ["a=1"])
    records.keep_original_hydra_files(run, 0, run / ".hydra")
    _hydra_files(run / ".hydra", ["a=1", "stage.resume=auto"])  # Hydra overwrites them for the resume
    records.keep_original_hydra_files(run, 1, run / ".hydra")
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == ["a=1"]
    assert yaml.safe_load((run / ".hydra" / "overrides.resume-1.yaml").read_text()) == ["a=1", "stage.resume=auto"]
    assert yaml.safe_load((run / ".hydra" / "config.resume-1.yaml").read_text()) == {"seed": 2}
    # A resume that Hydra gave a dir of its own (stage.resume=auto without a run dir): that dir is removed.
    elsewhere = tmp_path / "new"
    _hydra_files(elsewhere / ".hydra", ["a=1", "b=2"])
    (elsewhere / "train.log").write_text("")
    records.keep_original_hydra_files(run, 2, elsewhere / ".hydra")
    assert yaml.safe_load((run / ".hydra" / "overrides.resume-2.yaml").read_text()) == ["a=1", "b=2"]
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == ["a=1"] and not elsewhere.exists()
    keep = tmp_path / "keep"
    _hydra_files(keep / ".hydra", [])
    (keep / "summary.json").write_text("{}")  # not only Hydra's files: left alone
    assert not records.remove_if_only_hydra_files(keep) and keep.exists()


def _segment(status: str, **fields) -> dict:
    return {"segment": 0, "status": status, "started_at": "2026-01-01T00:00:00.000+00:00", "seconds": 1.0,
            "pid": 1, "host": "elsewhere", **fields}


@pytest.mark.parametrize("segments,marker,expected", [
    ([_segment("finished")], None, "ok"),
    ([_segment("killed"), _segment("finished")], None, "ok"),
    ([_segment("running")], None, "incomplete"),  # its process is gone (another host here)
    ([_segment("killed"), _segment("running")], None, "incomplete"),
    ([_segment("interrupted")], "INTERRUPTED", "interrupted"),
    ([_segment("failed")], "FAILED", "FAILED"),
    ([_segment("failed"), _segment("finished")], "FAILED", "ok"),  # resumed to the end after a failure
    ([_segment("killed")], "FAILED", "FAILED"),  # a resume that failed at once (a bad override)
    ([_segment("running", pid=os.getpid(), host=socket.gethostname())], None, "running"),
    (None, None, "incomplete"),  # a run dir from before segments: no total time
])
def test_run_status(tmp_path, segments, marker, expected):
    summary = {"eval/loss": 1.0} if segments is None else {"eval/loss": 1.0, "segments": segments}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    if marker:
        (tmp_path / marker).write_text("x\n")
    assert records.run_status(tmp_path) == expected
    (tmp_path / "summary.json").write_text(json.dumps({"time/total_s": 3.0}))
    if segments is None:
        assert records.run_status(tmp_path) == "ok"


def test_a_dead_segment_is_closed_as_killed_at_its_last_write(tmp_path):
    start = time.time() - 100
    segment = _segment("running", started_at=records._iso(start), last_step=2, seconds=None)
    (tmp_path / "summary.json").write_text(json.dumps({"x": 1, "segments": [segment]}))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(6)))
    last_write = start + 40
    os.utime(tmp_path / "metrics.jsonl", (last_write, last_write))
    os.utime(tmp_path / "summary.json", (start + 1, start + 1))
    segments = records.Segments(tmp_path, resuming=True, overrides=["a=1"])
    (dead,) = segments.earlier
    assert dead["status"] == "killed" and dead["last_step"] == 5
    assert dead["seconds"] == pytest.approx(40.0, abs=0.01)
    assert segments.index == 1 and segments.previous_summary == {"x": 1}
    assert segments.total_seconds() == pytest.approx(40.0, abs=1.0)


# ------------------------------------------------------------------------------------ stage.resume=auto
def _compose_with_hydra(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    from conftest import CONF_DIR
    from marl_exp.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _fake_run(run_dir: Path, cfg, status: str, age_s: float) -> Path:
    from marl_exp.config import to_yaml

    run_dir.mkdir(parents=True)
    (run_dir / "resolved_config.yaml").write_text(to_yaml(cfg))
    (run_dir / "summary.json").write_text(json.dumps({"segments": [_segment(status)]}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    for path in (run_dir / "summary.json", run_dir / "metrics.jsonl"):
        os.utime(path, (time.time() - age_s,) * 2)
    return run_dir


def test_resume_auto_without_a_run_dir_finds_the_latest_interrupted_run_of_the_same_config(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    out = tmp_path / "out"
    cfg = _compose_with_hydra("logger=none", f"output_dir={out}", "stage.resume=auto", "stage.steps=7")
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    run_as = lambda *o: OmegaConf.masked_copy(_compose_with_hydra("logger=none", f"output_dir={out}", *o),  # noqa: E731
                                              [k for k in cfg if k != "hydra"])
    same = run_as("stage.steps=7", "logger=wandb")  # where it logs does not matter
    older = _fake_run(out / "runs" / "d" / "older", same, "killed", age_s=300)
    newer = _fake_run(out / "multirun" / "d" / "t" / "3", same, "interrupted", age_s=100)
    _fake_run(out / "runs" / "d" / "finished", same, "finished", age_s=10)
    _fake_run(out / "runs" / "d" / "other-seed", run_as("stage.steps=7", "seed=1"), "killed", age_s=10)
    _fake_run(out / "runs" / "d" / "other-steps", run_as("stage.steps=8"), "killed", age_s=10)
    fresh = out / "runs" / "d" / "new"
    fresh.mkdir()
    HydraConfig.instance().set_config(cfg)
    try:
        assert not records.run_dir_given()
        assert records.resume_run_dir(task, fresh) == newer
        newer.rename(out / "gone")
        assert records.resume_run_dir(task, fresh) == older
        older.rename(out / "gone-too")
        with pytest.raises(ConfigError, match=r"stage.resume=auto found no interrupted run of this config .*"
                                              r"hydra.run.dir=<run dir> stage.resume=auto"):
            records.resume_run_dir(task, fresh)
        # Given a run dir, or a dir with something to resume, nothing is searched.
        assert records.resume_run_dir(task, out / "runs" / "d" / "finished") == out / "runs" / "d" / "finished"
    finally:
        HydraConfig.instance().cfg = None
    assert records.run_dir_given()  # outside Hydra the caller gives the dir
    assert records.resume_run_dir(task, fresh) == fresh


def test_resume_auto_with_nothing_to_resume_fails_with_one_line(tmp_path, capsys):
    """Through ``cli.main`` under Hydra (as ``python train.py stage.resume=auto`` runs it): exit 2, one line,
    before anything loads."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from marl_exp import cli

    cfg = _compose_with_hydra("logger=none", f"output_dir={tmp_path}", "stage.resume=auto")
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    fresh = tmp_path / "runs" / "2026-01-31" / "12-00-00_ppo"  # the dir Hydra made for this process
    fresh.mkdir(parents=True)
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(task, run_dir=fresh)
    finally:
        HydraConfig.instance().cfg = None
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "stage.resume=auto found no interrupted run of this config" in errors[0]
    assert "hydra.run.dir=<run dir> stage.resume=auto" in errors[0]
    assert (fresh / "FAILED").exists() and not (fresh / "summary.json").exists()
