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
from marl_exp import distributed

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


def test_single_process_is_a_no_op():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.tensor([1.0, 2.0])
    distributed.average_gradients([param])
    assert param.grad.tolist() == [1.0, 2.0]
    assert distributed.mean_metrics({"a": 1.0}) == {"a": 1.0} and distributed.any_rank(True)
