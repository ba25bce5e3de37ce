"""Robustness: interruption and resume, non-finite values, W&B faults, safe loading and secrets."""

from __future__ import annotations

import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb

from conftest import QUICK, REPO, compose
from marl_exp import cli
from marl_exp.config import ConfigError, validate
from marl_exp.modeling.loading import load_tokenizer, resolve_device
from marl_exp.rl import trainer as trainer_module
from marl_exp.rl.checkpoint import is_complete, latest_checkpoint
from marl_exp.rl.trainer import RLTrainer
from marl_exp.run.interrupt import StageInterrupted, stop_on_signal
from marl_exp.stages.pipeline import run_stage
from marl_exp.stages.rl_models import build_roles

SMALL = ("stage.batch_size=8", "stage.optim.mini_batch_size=4", "stage.eval.eval_samples=8", "stage.sampling.max_new_tokens=8",
         "stage.eval.eval_every=0", "stage.save_every=0")


def chain_overrides(chain) -> tuple[str, ...]:
    return (f"stage.sft_model={chain['sft_model']}", f"stage.reward_adapter={chain['reward_adapter']}")


def ppo_cfg(chain, out, *overrides):
    return compose("stage=ppo", "logger=none", f"output_dir={out}", *chain_overrides(chain), *SMALL, *overrides)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ------------------------------------------------------------------------------------------ interruption
def test_sigint_during_ppo_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(trained_chain, tmp_path):
    run_dir = tmp_path / "run"
    overrides = ["stage=ppo", "logger=none", f"output_dir={tmp_path / 'out'}", *chain_overrides(trained_chain),
                 *SMALL, "stage.steps=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"],
                                cwd=REPO, env=env, stdout=out, stderr=err)
        deadline = time.monotonic() + 300
        while not any(r["step"] >= 2 and "ppo/loss/total" in r for r in read_metrics(run_dir)):
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() < deadline, "no PPO step 2 in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        returncode = proc.wait(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    assert returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("marl-exp: the ppo stage was interrupted by SIGINT")]
    assert len(lines) == 1, stderr[-3000:]
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint is not None and is_complete(checkpoint)
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 8
    assert f"at step {step}; checkpoint saved to {checkpoint}" in lines[0]
    assert (run_dir / cli.INTERRUPTED_MARKER).exists() and not (run_dir / cli.FAILURE_MARKER).exists()
    assert not (run_dir / "policies").exists()  # the final outputs are only written by a complete run

    # The message's command, as given, resumes in the same run dir.
    command = lines[0].split("Resume with: ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"] and args[-2:] == [f"hydra.run.dir={run_dir}", "stage.resume=auto"]
    assert args[2:-2] == overrides  # the same overrides
    resumed = subprocess.run([sys.executable, *args[1:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stderr + resumed.stdout
    assert not (run_dir / cli.INTERRUPTED_MARKER).exists()
    summary = json.loads((run_dir / "summary.json").read_text())

    full = run_stage(ppo_cfg(trained_chain, tmp_path / "out", "stage.steps=8"), tmp_path / "full")
    after = {k: v for k, v in full.items() if k.startswith(("eval/after/", "eval/before/"))}
    assert len(after) >= 6
    assert {k: summary[k] for k in after} == after
    assert summary["train/steps"] == 8


class _SignalAtStep:
    """A stand-in for the SFT stage's TrackerCallback that also sends a signal at one step."""

    def __init__(self, step: int, signum: int):
        from marl_exp.run.tracking import TrackerCallback

        self.step, self.signum, self.base = step, signum, TrackerCallback

    def __call__(self, tracker):
        step, signum = self.step, self.signum

        class Callback(self.base):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    os.kill(os.getpid(), signum)
                return control

        return Callback(tracker)


def test_sigterm_during_an_upstream_sft_build_stops_without_a_complete_cache_entry(tmp_path, monkeypatch, capsys):
    from marl_exp.stages import sft

    monkeypatch.setattr(sft, "TrackerCallback", _SignalAtStep(1, signal.SIGTERM))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cfg = compose("stage=reward", f"output_dir={tmp_path}", *QUICK)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg, run_dir=tmp_path / "run")
    assert exit_info.value.code == 143
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the previous handlers are back
    message = [line for line in capsys.readouterr().err.splitlines() if line.startswith("marl-exp:")]
    assert message == [
        "marl-exp: the sft stage was interrupted by SIGTERM at step 1; the SFT and reward stages keep no "
        "checkpoints (they are short): resuming means rerunning, with: python train.py <same overrides> "
        f"hydra.run.dir={tmp_path / 'run'}"]
    # The interrupted build is not in the cache, and its half-built dir is gone too (issue 15: no stale dirs).
    assert not list((tmp_path / "cache").glob("sft-*"))
    assert not list((tmp_path / "cache").glob(".sft-*.building-*"))
    assert (tmp_path / "run" / cli.INTERRUPTED_MARKER).exists()


def test_stop_on_signal_restores_the_previous_handlers():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with stop_on_signal() as stop:
            assert signal.getsignal(signal.SIGTERM) is not mine
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert stop.signum == signal.SIGTERM
            with pytest.raises(StageInterrupted) as err:
                stop.raise_if_requested("ppo", 3)
            assert err.value.exit_code == 143
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------- non-finite values
@pytest.fixture(scope="module")
def roles_and_tokenizer(trained_chain, tmp_path_factory):
    cfg = ppo_cfg(trained_chain, tmp_path_factory.mktemp("nonfinite"), "stage.steps=4", "stage.optim.ppo_epochs=1")
    roles = build_roles(cfg, str(trained_chain["sft_model"]), str(trained_chain["reward_adapter"]), resolve_device("cpu"))
    return roles, load_tokenizer(str(trained_chain["sft_model"])), cfg


def _snapshot(roles, trainer):
    weights = [p.detach().clone() for p in roles.model.trainable_parameters("policy")]
    return weights, trainer.algorithm.kl_ctls["policy"].value, trainer.algorithm.score_moments["policy"].state_dict()


def _restore(roles, weights):
    for p, w in zip(roles.model.trainable_parameters("policy"), weights):
        p.data.copy_(w)


def test_nan_rewards_skip_the_update_and_are_counted(roles_and_tokenizer, monkeypatch):
    roles, tokenizer, cfg = roles_and_tokenizer
    stage = cfg.stage.copy()
    stage.scores.whiten_scores = True  # NaN must not reach the running score statistics either
    trainer = RLTrainer(roles, tokenizer, stage, ["the movie was", "the plot felt"], seed=0)
    weights, kl_coef, moments = _snapshot(roles, trainer)
    real = roles.reward_scores
    monkeypatch.setattr(roles, "reward_scores", lambda *a, **k: real(*a, **k) * float("nan"))
    try:
        stats = trainer.step()
        assert stats["ppo/nonfinite_step"] == 1 and stats["ppo/skipped_nonfinite"] == 2  # 1 epoch x 2 mini-batches
        assert stats["ppo/nonfinite_steps_in_a_row"] == 1 and trainer.step_count == 1
        after, kl_after, moments_after = _snapshot(roles, trainer)
        assert all(torch.equal(a, b) for a, b in zip(after, weights))  # never applied
        assert kl_after == kl_coef and moments_after == moments
        assert all(not s for s in trainer.policies["policy"].optimizer.state.values())  # no Adam moments either
        monkeypatch.setattr(roles, "reward_scores", real)
        stats = trainer.step()  # a good step: updates again, and the run of bad steps is over
        assert stats["ppo/nonfinite_step"] == 0 and stats["ppo/skipped_nonfinite"] == 0
        assert stats["ppo/nonfinite_steps_in_a_row"] == 0 and stats["ppo/nonfinite_steps_total"] == 1
        assert any(not torch.equal(a, b) for a, b in zip(_snapshot(roles, trainer)[0], weights))
    finally:
        _restore(roles, weights)


@pytest.mark.parametrize("field", ["logits", "values"])
def test_non_finite_training_forward_skips_every_update(roles_and_tokenizer, monkeypatch, field):
    """inf logits (→ non-finite log-probs) or NaN values (→ NaN value loss) in the optimisation forward."""
    roles, tokenizer, cfg = roles_and_tokenizer
    trainer = RLTrainer(roles, tokenizer, cfg.stage, ["the movie was"], seed=0)
    weights, _, _ = _snapshot(roles, trainer)
    real = roles.model.policy_forward

    def faulty(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled():  # rollout scoring runs without grad; only the update's forward is hit
            bad = float("inf") if field == "logits" else float("nan")
            return type(out)(**{**vars(out), field: getattr(out, field) * bad})
        return out

    monkeypatch.setattr(roles.model, "policy_forward", faulty)
    try:
        stats = trainer.step()
        assert stats["ppo/skipped_nonfinite"] == 2 and stats["ppo/nonfinite_step"] == 1
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(roles, trainer)[0], weights))
        assert all(p.grad is None for p in roles.model.trainable_parameters("policy"))
    finally:
        _restore(roles, weights)


def test_sampling_on_non_finite_probabilities_is_a_skipped_step(roles_and_tokenizer, monkeypatch):
    roles, tokenizer, cfg = roles_and_tokenizer
    trainer = RLTrainer(roles, tokenizer, cfg.stage, ["the movie was"], seed=0)

    def broken(*args, **kwargs):
        raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")

    monkeypatch.setattr(trainer_module, "sample", broken)
    assert trainer.step()["ppo/nonfinite_step"] == 1


def test_k_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(trained_chain, tmp_path, monkeypatch,
                                                                             capsys):
    calls = []
    real = trainer_module.score_many

    def nan_from_step_3(roles, rollouts, *args, **kwargs):
        out = real(roles, rollouts, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            for rollout in out.values():
                rollout.raw_scores = torch.full_like(rollout.raw_scores, float("nan"))
        return out

    monkeypatch.setattr(trainer_module, "score_many", nan_from_step_3)
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.steps=6", "stage.save_every=1", "stage.optim.max_bad_steps=2",
                  "stage.optim.ppo_epochs=1")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(cfg, run_dir=tmp_path / "run")
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("marl-exp: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "marl-exp: error: PPO stopped at step 4: 2 steps in a row had non-finite values (last: non-finite reward "
        "scores (raw_scores) of policy 'policy'); stage.optim.max_bad_steps=2.")
    assert (tmp_path / "run" / cli.FAILURE_MARKER).exists()
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000001", "step-000002"]  # none after a bad step
    assert latest_checkpoint(tmp_path / "run") == checkpoints[-1] and is_complete(checkpoints[-1])
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run") if "ppo/nonfinite_step" in r}
    assert [rows[s]["ppo/nonfinite_step"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert rows[4]["ppo/nonfinite_steps_total"] == 2 and rows[4]["ppo/skipped_nonfinite"] == 2


# ----------------------------------------------------------------------------------------- W&B and secrets
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, like a real key
FAKE_HF_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"


def _secret_files(run_dir: Path) -> list[str]:
    hits = []
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if FAKE_WANDB_KEY.encode() in data or FAKE_HF_TOKEN.encode() in data:
                hits.append(str(path.relative_to(run_dir)))
    return hits


@pytest.mark.parametrize("mode", ["offline", "unreachable"])
def test_wandb_faults_never_stop_training_and_secrets_are_never_written(trained_chain, tmp_path, monkeypatch,
                                                                        caplog, mode):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    if mode == "unreachable":  # online, to a closed port on loopback: nothing leaves the machine
        monkeypatch.delenv("WANDB_MODE", raising=False)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")  # wandb.Settings(init_timeout=...) from the environment
    cfg = ppo_cfg(trained_chain, tmp_path, "stage.steps=1", "logger=wandb",
                  f"logger.mode={'online' if mode == 'unreachable' else 'offline'}")
    # wandb reads its environment once per process: start afresh so the loopback host is the one used.
    wandb.teardown()
    try:
        if mode == "unreachable":
            settings = wandb.setup().settings
            assert settings.base_url == "http://127.0.0.1:9" and settings.init_timeout == 5
        summary = run_stage(cfg, tmp_path / "run")
    finally:
        monkeypatch.undo()
        wandb.teardown()
    assert "eval/after/oracle_score" in summary
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    warnings = [r.getMessage() for r in caplog.records if "W&B online init failed" in r.getMessage()]
    assert len(warnings) == (1 if mode == "unreachable" else 0)
    assert all("127.0.0.1:9" in w for w in warnings)
    assert _secret_files(tmp_path / "run") == []


# ---------------------------------------------------------------------------------------- safe loading
def test_trust_remote_code_is_off_unless_explicitly_allowed(monkeypatch):
    from marl_exp.modeling.loading import _hub_kwargs

    cfg = compose()
    assert cfg.model.trust_remote_code is False and _hub_kwargs(cfg.model)["trust_remote_code"] is False
    monkeypatch.delenv("MARL_EXP_ALLOW_REMOTE_CODE", raising=False)
    with pytest.raises(ConfigError, match="model.trust_remote_code=true runs code from the hub"):
        validate(compose("model.trust_remote_code=true"))
    monkeypatch.setenv("MARL_EXP_ALLOW_REMOTE_CODE", "1")
    validate(compose("model.trust_remote_code=true"))


def test_every_torch_load_in_src_is_weights_only():
    calls = []
    for path in (REPO / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load") and \
                    "torch" in ast.unparse(node.func):
                calls.append((path.name, node))
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("pickle.load", "pickle.loads"):
                pytest.fail(f"{path}: pickle load")
    assert calls, "expected the checkpoint loader's torch.load"
    for name, node in calls:
        kwargs = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kwargs and ast.literal_eval(kwargs["weights_only"]) is True, name
