"""Critic-free advantages and step metrics in a data-parallel run: two gloo processes against one process
over the same global batch. Batch statistics (REINFORCE++'s whitening, GRPO ``scale_rewards=batch``, RLOO
``normalize_advantages``) are global, as in TRL; metrics TRL reduces with min / max are reduced so."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from conftest import compose
from marl_exp.rl.algorithms.critic_free import CriticFree
from marl_exp.rl.rollout import Rollout
from marl_exp.run import distributed

WORLD = 2
CASES = {  # name -> the stage and overrides whose batch statistic is under test
    "reinforce_pp": ("reinforce_pp", ()),
    "grpo_scale_batch": ("grpo", ("stage.advantages.scale_rewards=batch",)),
    "rloo_normalized": ("rloo", ("stage.advantages.normalize_advantages=true",)),
}
RANK_METRICS = [  # what each rank's step reports (TRL's names; "alice/": one of several policies)
    {"loss": 1.0, "clip_ratio/low_min": 0.25, "clip_ratio/high_max": 0.5, "completions/min_length": 3.0,
     "completions/max_length": 9.0, "alice/clip_ratio/low_min": 0.0, "alice/completions/max_length": 4.0},
    {"loss": 3.0, "clip_ratio/low_min": 0.75, "clip_ratio/high_max": 0.125, "completions/min_length": 5.0,
     "completions/max_length": 7.0, "alice/clip_ratio/low_min": 0.5, "alice/completions/max_length": 8.0},
]


def _stage(case: str):
    stage, overrides = CASES[case]
    return compose(f"stage={stage}", "logger=none", "stage.batch_size=8", "stage.sampling.num_generations=4",
                   "stage.kl.beta=0.1", *overrides).stage


def _algorithm(stage) -> CriticFree:
    """The stage's algorithm, which is what advantage estimation reads (no model: phase 4 needs none)."""
    return CriticFree(stage)


def _rank_rollout(rank: int) -> Rollout:
    """Rank ``rank``'s two groups of four; rank 1's scores are higher and its responses longer."""
    gen = torch.Generator().manual_seed(100 + rank)
    batch, width = 8, 5 + 2 * rank
    lengths = torch.randint(1, width + 1, (batch,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    ids = torch.zeros(batch, width, dtype=torch.long)
    return Rollout(query_ids=ids[:, :2], query_mask=torch.ones(batch, 2, dtype=torch.long), response_ids=ids,
                   response_mask=mask.long(), kl=torch.randn(batch, width, generator=gen) * 0.3,
                   scores=torch.randn(batch, generator=gen) + 2.0 * rank)


def _global_rollout() -> Rollout:
    """Both ranks' rollouts as one batch (rank order, padded to the longer response)."""
    parts = [_rank_rollout(rank) for rank in range(WORLD)]
    width = max(p.response_mask.shape[1] for p in parts)

    def cat(field):
        return torch.cat([torch.nn.functional.pad(getattr(p, field), (0, width - getattr(p, field).shape[1]))
                          for p in parts])

    ids = cat("response_ids")
    return Rollout(query_ids=ids[:, :2], query_mask=torch.ones(len(ids), 2, dtype=torch.long), response_ids=ids,
                   response_mask=cat("response_mask"), kl=cat("kl"),
                   scores=torch.cat([p.scores for p in parts]))


def _worker(rank: int, init_file: str, stages: dict, results: dict) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        advantages = {}
        for case, stage in stages.items():
            advantages[case], _ = _algorithm(stage).advantages("policy", _rank_rollout(rank))
        results[rank] = {"advantages": advantages, "metrics": distributed.mean_metrics(RANK_METRICS[rank])}
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    results = mp.Manager().dict()
    stages = {case: _stage(case) for case in CASES}
    mp.spawn(_worker, args=(str(tmp_path_factory.mktemp("dist") / "init"), stages, results), nprocs=WORLD, join=True)
    return dict(results)


@pytest.mark.parametrize("case", list(CASES))
def test_advantages_on_two_ranks_equal_one_process_over_the_global_batch(two_ranks, case):
    whole = _global_rollout()
    expected, _ = _algorithm(_stage(case)).advantages("policy", whole)
    start = 0
    for rank in range(WORLD):
        local = _rank_rollout(rank)
        rows, width = local.response_mask.shape
        got = two_ranks[rank]["advantages"][case]
        assert got.shape == (rows, width)
        # The same computation on the same global batch: equal bit for bit.
        torch.testing.assert_close(got, expected[start:start + rows, :width], atol=0, rtol=0)
        start += rows


def test_min_and_max_metrics_are_reduced_as_trl_does_across_ranks(two_ranks):
    # TRL's GRPOTrainer / RLOOTrainer: nanmin / nanmax / min / max of the values gathered from every process.
    expected = {"loss": 2.0, "clip_ratio/low_min": 0.25, "clip_ratio/high_max": 0.5, "completions/min_length": 3.0,
                "completions/max_length": 9.0, "alice/clip_ratio/low_min": 0.0, "alice/completions/max_length": 8.0}
    for rank in range(WORLD):
        assert two_ranks[rank]["metrics"] == expected
