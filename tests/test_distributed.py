"""Data-parallel runs: the collectives on two real gloo processes, and whole stages under `accelerate launch`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import QUICK, REPO
from marl_exp.run import distributed

WORLD = 2


def _collectives_worker(rank: int, init_file: str, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # same weights and data on both ranks; each takes its half of the batch
        layer = torch.nn.Linear(3, 2)
        x, y = torch.randn(8, 3), torch.randn(8, 2)
        half = slice(rank * 4, rank * 4 + 4)
        torch.nn.functional.mse_loss(layer(x[half]), y[half]).backward()
        distributed.average_gradients(list(layer.parameters()))
        results[rank] = {
            "grads": [p.grad.clone() for p in layer.parameters()],
            "metrics": distributed.mean_metrics({"loss": float(rank), "name": f"rank{rank}", "only0": 5.0}
                                                if rank == 0 else {"loss": float(rank), "name": "x"}),
            "any": distributed.any_rank(rank == 1), "none": distributed.any_rank(False),
            "broadcast": distributed.broadcast(f"from {rank}"),
            "cat": distributed.cat_tensors(torch.tensor([float(rank)] * (rank + 1))).tolist(),
            "main": distributed.is_main(),
            "mean": distributed.mean(float(rank)),
        }
    finally:
        torch.distributed.destroy_process_group()


def test_collectives_on_two_gloo_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_collectives_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)

    torch.manual_seed(0)  # the same model on one process over the whole batch
    layer = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    torch.nn.functional.mse_loss(layer(x), y).backward()
    for rank in range(WORLD):
        for got, want in zip(results[rank]["grads"], layer.parameters()):
            torch.testing.assert_close(got, want.grad)  # averaged half-batch grads = full-batch grad
    assert results[0]["metrics"] == results[1]["metrics"] == {"loss": 0.5, "name": "rank0", "only0": 5.0}
    assert results[0]["any"] and results[1]["any"] and not results[0]["none"]
    assert results[0]["broadcast"] == results[1]["broadcast"] == "from 0"
    assert results[0]["cat"] == [0.0, 1.0, 1.0] and results[0]["main"] and not results[1]["main"]
    assert results[0]["mean"] == results[1]["mean"] == 0.5


def test_single_process_is_a_no_op():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, 2.0])
    distributed.average_gradients([param])
    assert param.grad.tolist() == [1.0, 2.0]
    assert distributed.mean_metrics({"a": 1.0}) == {"a": 1.0} and distributed.any_rank(True)


# --------------------------------------------------------------------------------- accelerate launch
def accelerate_launch(tmp_path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `--multi_gpu` is accelerate's torchrun launcher; with device=cpu it starts CPU processes (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "train.py", "device=cpu", *overrides, f"output_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'run'}"]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_ppo_data_parallel_on_two_cpu_processes(trained_chain, tmp_path):
    result = accelerate_launch(
        tmp_path, "stage=ppo", "logger=none", f"stage.sft_model={trained_chain['sft_model']}",
        f"stage.reward_adapter={trained_chain['reward_adapter']}", "stage.steps=3", "stage.batch_size=8",
        "stage.optim.mini_batch_size=4", "stage.optim.ppo_epochs=2", "stage.eval.eval_samples=8", "stage.save_every=2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dist/world_size"] == WORLD
    # Gradients were averaged: both ranks end with exactly the same policy weights.
    assert summary["dist/max_weight_divergence"] == 0.0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if "env/reward_mean" in line]
    assert [s["step"] for s in steps] == [1, 2, 3]  # rank 0 alone writes: one line per step
    assert (run / "policies" / "policy" / "adapter_config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == \
        ["step-000002", "step-000003"]
    assert result.stdout.count("run finished") + result.stderr.count("run finished") == 1


@pytest.mark.slow
def test_sft_and_reward_stages_under_accelerate(tmp_path):
    result = accelerate_launch(tmp_path, "stage=reward", *QUICK, "upstream.sft.max_steps=3",
                               "upstream.sft.batch_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dist/world_size"] == WORLD and summary["train/steps"] == 3
    assert summary["dist/trainer_processes"] == WORLD  # TRL's trainer ran data parallel (DDP over gloo)
    sft_summary = json.loads(next((tmp_path / "cache").glob("sft-*/summary.json")).read_text())
    assert sft_summary["dist/trainer_processes"] == WORLD
    assert (tmp_path / "run" / "reward_adapter" / "adapter_model.safetensors").exists()
    sft_entries = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("sft-")]
    assert len(sft_entries) == 1 and (sft_entries[0] / "model" / "model.safetensors").exists()
    assert not list((tmp_path / "cache").glob(".*building*"))  # built once, renamed once
