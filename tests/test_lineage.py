"""W&B lineage: stage outputs logged as model artifacts, inputs declared as used, offline for `wandb sync`.

The offline checks read what wandb wrote to disk (``wandb_files``: the run's ``.wandb`` file, and a stub
W&B server for ``wandb sync``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK, compose
from wandb_files import StubWandbServer, wandb_records
from marl_exp.config import ConfigError
from marl_exp.run import lineage
from marl_exp.run.tracking import Tracker
from marl_exp.stages.pipeline import cache_dir, run_stage, upstream_config

QUICK_WANDB = tuple(o for o in QUICK if not o.startswith("logger=")) + ("logger=wandb",)
QUICK_DATA = tuple(o for o in QUICK if o.startswith("data."))
PPO_SMALL = ("stage.steps=2", "stage.batch_size=8", "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=8",
             "stage.sampling.max_new_tokens=8", "stage.eval.eval_every=0", "stage.save_every=0")


@pytest.fixture(autouse=True)
def wandb_data_dir(tmp_path, monkeypatch):
    """wandb stages copies of uploaded artifact files under WANDB_DATA_DIR (default: in HOME)."""
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def artifact_records(run_dir: Path) -> tuple[list, list]:
    """(logged, used) artifact records of a run: used = recorded with use_after_commit. Not the
    artifacts wandb makes of logged tables (PPO's samples)."""
    artifacts = [r.artifact for r in wandb_records(run_dir)
                 if r.WhichOneof("record_type") == "artifact" and r.artifact.type != "run_table"]
    return [a for a in artifacts if not a.use_after_commit], [a for a in artifacts if a.use_after_commit]


def run_id(run_dir: Path) -> str:
    (record,) = [r.run for r in wandb_records(run_dir) if r.WhichOneof("record_type") == "run"]
    return record.run_id


def manifest(artifact) -> dict:
    return {entry.path: entry for entry in artifact.manifest.contents}


# ------------------------------------------------------------------------------------ fast checks
def fake_sft_output(run_dir: Path) -> Path:
    """An SFT run dir with a model/ of two files, one of them 'big'."""
    model = run_dir / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return model


def sft_cfg(tmp_path, *overrides):
    return compose("stage=sft", "logger=wandb", f"output_dir={tmp_path}", *overrides)


def test_offline_use_is_recorded_as_the_same_artifact_with_use_after_commit(tmp_path):
    cfg = sft_cfg(tmp_path)
    model = fake_sft_output(tmp_path / "up")
    with Tracker(cfg, tmp_path / "up", job_type="sft") as tracker:
        assert tracker.wandb_run.offline
        lineage.log_outputs(tracker, cfg, tmp_path / "up", {"eval/loss": 1.5, "train/steps": 3, "x": "y"},
                            tmp_path / "up")
    record = json.loads((model / lineage.RECORD).read_text())
    with Tracker(compose("stage=reward", "logger=wandb"), tmp_path / "down", job_type="reward") as tracker:
        import wandb

        with pytest.raises(TypeError, match="offline"):  # why lineage does not call it offline
            tracker.wandb_run.use_artifact(wandb.Artifact("sft-x", type="model"))
        lineage.use_inputs(tracker, cfg, {"sft_model": str(model)})

    (logged,), used = artifact_records(tmp_path / "up")
    assert used == []
    no_logged, (declared,) = artifact_records(tmp_path / "down")
    assert no_logged == []
    assert logged.type == declared.type == "model"
    assert logged.name == declared.name == record["name"] and logged.name.startswith("sft-")
    assert logged.digest == declared.digest == record["digest"]
    assert logged.run_id == run_id(tmp_path / "up") and declared.run_id == run_id(tmp_path / "down")
    assert json.loads(logged.metadata) == json.loads(declared.metadata) == record["metadata"]
    metadata = record["metadata"]
    assert metadata["metrics"] == {"eval/loss": 1.5, "train/steps": 3}
    assert metadata["quant"] == "fp32" and metadata["finetune"] == "full" and metadata["model_fingerprint"]
    assert {"base_model", "fingerprint"} <= metadata.keys()
    assert set(manifest(logged)) == set(manifest(declared)) == {"config.json", "model.safetensors"}


def test_reference_and_upload_give_the_same_digest(tmp_path):
    model = fake_sft_output(tmp_path / "run")
    published = tmp_path / "final"
    digests = {}
    for mode, max_mb in (("upload", 100), ("reference", 100), ("auto", 0.01)):
        cfg = sft_cfg(tmp_path, f"logger.artifacts={mode}", f"logger.artifact_max_upload_mb={max_mb}")
        tracker = Tracker(cfg, tmp_path / f"t-{mode}", job_type="sft")
        artifact, files = lineage.build_artifact("sft-x", {}, model, published, lineage._upload_rule(tracker))
        tracker.finish()
        entries = artifact.manifest.entries
        digests[mode] = artifact.digest
        uploaded = {name for name, info in files.items() if info["uploaded"]}
        assert uploaded == {"upload": {"config.json", "model.safetensors"}, "reference": set(),
                            "auto": {"config.json"}}[mode]
        for name in set(files) - uploaded:  # references point where the files will be, with their MD5
            assert entries[name].ref == (published / name).resolve().as_uri()
            assert entries[name].digest == files[name]["md5"]
    assert len(set(digests.values())) == 1, digests


def test_declared_input_reuses_the_logged_layout_and_warns_when_files_changed(tmp_path, caplog, monkeypatch):
    cfg = sft_cfg(tmp_path, "logger.artifacts=reference")
    model = fake_sft_output(tmp_path / "up")
    with Tracker(cfg, tmp_path / "up", job_type="sft") as tracker:
        lineage.log_outputs(tracker, cfg, tmp_path / "up", {}, tmp_path / "up")
    upload_all = lambda rel, size: True  # noqa: E731 - this run would upload; the record says reference
    with monkeypatch.context() as patch:  # unchanged files (size, mtime) are not hashed again
        patch.setattr(lineage, "_md5_b64", lambda path: pytest.fail(f"{path} hashed again"))
        same = lineage.input_artifact(str(model), model, "sft", upload=upload_all)
    assert all(entry.ref for entry in same.manifest.entries.values())
    assert same.digest == json.loads((model / lineage.RECORD).read_text())["digest"]
    (model / "config.json").write_text("{}")
    changed = lineage.input_artifact(str(model), model, "sft", upload=upload_all)
    assert changed.digest != same.digest and changed.name == same.name
    assert "changed since it was logged" in caplog.text


@pytest.mark.parametrize("overrides", [("logger=none",), ("logger=wandb", "logger.mode=disabled"),
                                       ("logger=wandb", "logger.artifacts=none")])
def test_no_wandb_run_means_no_artifacts(tmp_path, monkeypatch, overrides):
    if "logger.mode=disabled" in overrides:
        monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins over the config
    model = fake_sft_output(tmp_path / "run")
    cfg = sft_cfg(tmp_path, *overrides)
    with Tracker(cfg, tmp_path / "run", job_type="sft") as tracker:
        assert not tracker.logs_artifacts
        lineage.log_outputs(tracker, cfg, tmp_path / "run", {}, tmp_path / "run")
        lineage.use_inputs(tracker, cfg, {"sft_model": str(model)})
        tracker.log_artifact(object())  # not even looked at
        tracker.use_artifact(object())
    assert not (model / lineage.RECORD).exists()
    if cfg.logger.artifacts == "none":  # an offline run without artifact records
        assert artifact_records(tmp_path / "run") == ([], [])


def test_bad_artifacts_mode_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"logger.artifacts='sometimes' is not valid; use one of auto"):
        Tracker(sft_cfg(tmp_path, "logger.artifacts=sometimes"), tmp_path, job_type="sft")


def test_input_logged_without_wandb_is_declared_under_its_cache_entry_name(tmp_path):
    cfg = compose("stage=reward", "logger=wandb", f"output_dir={tmp_path}")
    entry = cache_dir(upstream_config(cfg, "sft"))
    model = fake_sft_output(entry)  # no RECORD: the SFT ran with logger=none
    with Tracker(cfg, tmp_path / "down", job_type="reward") as tracker:
        lineage.use_inputs(tracker, cfg, {"sft_model": str(model)})
    _, (declared,) = artifact_records(tmp_path / "down")
    assert declared.name == entry.name and declared.type == "model"
    assert json.loads(declared.metadata) == {"stage": "sft", "path": str(model.resolve())}
    assert lineage.default_input_name(str(tmp_path), tmp_path / "x" / "model", "sft") == "sft-x-model"
    assert lineage.default_input_name("org/name", model, "sft") == "sft-org-name"


class FakeRun:
    def __init__(self, offline: bool):
        self.offline, self.disabled, self.calls = offline, False, []

    def use_artifact(self, artifact):
        self.calls.append(("use_artifact", artifact))

    def _log_artifact(self, artifact, **kwargs):
        self.calls.append(("_log_artifact", artifact, kwargs))


def test_use_artifact_online_and_offline(tmp_path):
    tracker = Tracker(compose("logger=none"), tmp_path, job_type="ppo")
    tracker.wandb_run = online = FakeRun(offline=False)
    tracker.use_artifact("artifact")
    tracker.wandb_run = offline = FakeRun(offline=True)
    tracker.use_artifact("artifact")
    assert online.calls == [("use_artifact", "artifact")]
    assert offline.calls == [("_log_artifact", "artifact", {"is_user_created": True, "use_after_commit": True})]


def test_key_metrics_of_one_policy_among_several():
    summary = {"eval/after/oracle_score": 0.8, "eval/after/a/oracle_score": 0.8, "eval/after/b/oracle_score": 0.6,
               "eval/before/b/kl": 0.0, "train/steps": 5, "ppo/loss": 1.0, "eval/bad": float("nan"), "flag": True}
    assert lineage.key_metrics(summary, "b") == {"eval/after/oracle_score": 0.6, "eval/before/kl": 0.0,
                                                 "train/steps": 5}
    assert lineage.key_metrics(summary) == {"eval/after/oracle_score": 0.8, "eval/after/a/oracle_score": 0.8,
                                            "eval/after/b/oracle_score": 0.6, "eval/before/b/kl": 0.0,
                                            "train/steps": 5}


# --------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def offline_chain(tmp_path_factory):
    """SFT → reward → PPO with W&B offline. The reward run builds the SFT model into the cache (beside
    the entry, then renamed); the PPO run reuses it from the cache and is given the reward adapter.
    Weights above 1 MB are referenced, smaller files uploaded."""
    out = tmp_path_factory.mktemp("lineage") / "out"
    common = (f"output_dir={out}", "logger=wandb", "logger.artifact_max_upload_mb=1")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_DATA_DIR", str(out.parent / "wandb-data"))
        run_stage(compose("stage=reward", *QUICK_WANDB, *common), out / "reward_run")
        ppo_cfg = compose("stage=ppo", *QUICK_DATA, *PPO_SMALL, *common,
                          f"stage.reward_adapter={out / 'reward_run' / 'reward_adapter'}")
        run_stage(ppo_cfg, out / "ppo_run")
    (sft_entry,) = (out / "cache").glob("sft-*")
    return {"sft": sft_entry, "reward": out / "reward_run", "ppo": out / "ppo_run", "ppo_cfg": ppo_cfg}


@pytest.mark.slow
def test_wandb_offline_artifacts_carry_the_lineage(offline_chain):
    """Each run logs its output as a model artifact with metadata, and each downstream run declares the
    upstream artifacts with the same name, type and digest, also the SFT model reused from the cache."""
    sft_entry, reward_run, ppo_run, ppo_cfg = (offline_chain[k] for k in ("sft", "reward", "ppo", "ppo_cfg"))
    assert json.loads((ppo_run / "run_record.json").read_text())["inputs"]["sft_model"] == str(sft_entry / "model")

    (sft_art,), sft_used = artifact_records(sft_entry)
    (reward_art,), (reward_used_sft,) = artifact_records(reward_run)
    ppo_logged, ppo_used = artifact_records(ppo_run)
    assert sft_used == []
    assert [a.name for a in ppo_logged] == [f"{ppo_cfg_name(ppo_cfg)}-policy"]

    # Names, types, digests: after `wandb sync` each declaration resolves to the logged version.
    assert sft_art.name == sft_entry.name and reward_art.name.startswith("reward-")
    assert {a.type for a in (sft_art, reward_art, *ppo_logged, *ppo_used)} == {"model"}
    used_by_ppo = {a.name: a for a in ppo_used}
    assert set(used_by_ppo) == {sft_art.name, reward_art.name}
    for used, logged in ((reward_used_sft, sft_art), (used_by_ppo[sft_art.name], sft_art),
                         (used_by_ppo[reward_art.name], reward_art)):
        assert (used.name, used.type, used.digest) == (logged.name, logged.type, logged.digest)
        assert json.loads(used.metadata) == json.loads(logged.metadata)
    assert {a.run_id for a in ppo_used} == {ppo_logged[0].run_id} == {run_id(ppo_run)}

    # Metadata: base model and fingerprint, r, alpha, quant, key metrics.
    sft_meta, reward_meta, ppo_meta = (json.loads(a.metadata) for a in (sft_art, reward_art, ppo_logged[0]))
    assert sft_meta["stage"] == "sft" and sft_meta["finetune"] == "full" and sft_meta["quant"] == "fp32"
    assert sft_meta["base_model_name"] == "tiny" and sft_meta["fingerprint"] != sft_meta["model_fingerprint"]
    assert sft_meta["path"] == str(sft_entry / "model")
    sft_summary = json.loads((sft_entry / "summary.json").read_text())
    assert sft_meta["metrics"]["eval/loss"] == pytest.approx(sft_summary["eval/loss"])
    adapter = ppo_cfg.adapter
    for meta in (reward_meta, ppo_meta):
        assert meta["base_model"] == str(sft_entry / "model")
        assert meta["fingerprint"] == sft_meta["model_fingerprint"]  # trained on that SFT model
        assert (meta["r"], meta["lora_alpha"], meta["quant"]) == (adapter.r, adapter.lora_alpha, "fp32")
    reward_summary, ppo_summary = (json.loads((run / "summary.json").read_text()) for run in (reward_run, ppo_run))
    assert reward_meta["metrics"]["eval/pairwise_accuracy"] == pytest.approx(reward_summary["eval/pairwise_accuracy"])
    for key in ("eval/before/oracle_score", "eval/after/oracle_score", "eval/after/kl"):
        assert ppo_meta["metrics"][key] == pytest.approx(ppo_summary[key]), key
    assert ppo_meta["metrics"]["train/steps"] == ppo_summary["train/steps"] == 2

    # Files: weights over 1 MB are file:// references to the final place (not the build dir), the
    # rest is uploaded (staged copies); the declared manifests are the logged ones.
    sft_files = manifest(sft_art)
    assert sft_files["model.safetensors"].ref == (sft_entry / "model" / "model.safetensors").as_uri()
    assert not sft_files["config.json"].ref and sft_files["config.json"].local_path
    for used in (reward_used_sft, used_by_ppo[sft_art.name]):
        assert {p: (e.digest, bool(e.ref)) for p, e in manifest(used).items()} == \
               {p: (e.digest, bool(e.ref)) for p, e in sft_files.items()}
        # A declared input is not copied again: files to upload are read in place, if ever needed.
        assert manifest(used)["config.json"].local_path == str(sft_entry / "model" / "config.json")
    assert "adapter_model.safetensors" in manifest(reward_art) and lineage.RECORD not in manifest(reward_art)


def ppo_cfg_name(cfg) -> str:
    from marl_exp.stages.pipeline import config_hash

    return f"ppo-{config_hash(cfg)}"


@pytest.mark.slow
def test_wandb_sync_links_each_declared_input_to_the_logged_version(offline_chain, tmp_path):
    """`wandb sync` of the chain (upstream first) against a stub server: each downstream run's declaration
    resolves, by digest, to the version its upstream run logged, and is marked used by that run."""
    runs = {stage: next((offline_chain[stage] / "wandb").glob("offline-run-*")) for stage in ("sft", "reward", "ppo")}
    ids = {stage: run_id(offline_chain[stage]) for stage in runs}
    env = {**os.environ, "WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "HOME": str(tmp_path),
           "WANDB_SILENT": "false"}
    with StubWandbServer() as server:
        env["WANDB_BASE_URL"] = server.url
        for stage, run in runs.items():
            result = subprocess.run([str(Path(sys.executable).parent / "wandb"), "sync", "--yes", str(run)], env=env,
                                    cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0 and "Finished syncing" in result.stdout + result.stderr, result.stderr[-2000:]
    names = {stage: artifact_records(offline_chain[stage])[0][0].name for stage in runs}  # logged offline
    created = [(v["artifactCollectionName"], v.get("runName"), data["createArtifact"]["artifact"]["id"])
               for op, v, data in server.operations if op == "CreateArtifact" and v["artifactTypeName"] == "model"]
    # Each run's own output is created with its run; declarations (use_after_commit) carry none.
    logged = {stage: artifact_id for stage in runs for name, run, artifact_id in created
              if (name, run) == (names[stage], ids[stage])}
    assert len(logged) == 3 and {run for _, run, _ in created} == {*ids.values(), None}
    for name, run, artifact_id in created:  # every declaration resolved to the version logged upstream
        assert artifact_id == logged[next(stage for stage in runs if names[stage] == name)]
    used = {(v["runName"], v["artifactID"]) for op, v, _ in server.operations if op == "UseArtifact"}
    assert used == {(ids["reward"], logged["sft"]), (ids["ppo"], logged["sft"]), (ids["ppo"], logged["reward"])}
    assert all(version["state"] == "COMMITTED" for version in server.versions.values())
