"""Data-parallel runs under ``accelerate launch``: who writes, and the few collectives PPO needs.

One process per device. SFT and reward training get data parallelism from their TRL trainers; the PPO
loop is ours: every rank samples its own prompts, gradients are averaged before each optimizer step
(so the weights stay identical on every rank), decisions that change the control flow (skip a
mini-batch, stop early, stop on a signal) are taken jointly, and only rank 0 writes files and logs.
In a plain ``python train.py`` run every function here is a no-op.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def launched() -> bool:
    """Started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> None:
    """Join the process group the launcher described (gloo on CPU, nccl on GPUs).

    Accelerate's state is created here, with the device kind, because it is a singleton: TRL's trainers
    reuse it, and a state created for GPUs on a CPU-only run would turn their data parallelism off.
    """
    if not launched():
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ:
            log.warning("`accelerate launch --cpu` starts ONE process (several CPU processes need MPI in "
                        "accelerate); for N processes use `accelerate launch --multi_gpu --num_processes N "
                        "train.py device=cpu` or `torchrun --nproc_per_node N train.py device=cpu`")
        return
    from accelerate import PartialState

    PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not is_distributed():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks must agree on skips and stops, or they deadlock."""
    return any(gather(bool(flag))) if is_distributed() else bool(flag)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks (one all-reduce of the flattened trainable grads).

    Every rank's loss is a mean over equally many samples, so the mean of the gradients is the gradient
    of the loss over the union of the ranks' samples.
    """
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for param, grad in zip(params, grads):
        n = grad.numel()
        param.grad = flat[offset:offset + n].view_as(grad).to(grad.dtype)
        offset += n


def mean(value: float) -> float:
    """``value`` averaged over ranks (the same number on every rank)."""
    return sum(gather(value)) / world_size() if is_distributed() else value


# Metrics that TRL reduces over processes with min or max (of the gathered values), not the mean.
_MIN_METRICS = ("clip_ratio/low_min", "completions/min_length")
_MAX_METRICS = ("clip_ratio/high_max", "completions/max_length")


def mean_metrics(metrics: dict) -> dict:
    """Each numeric metric reduced over the ranks that have it: the mean, or the min / max for TRL's min /
    max metrics (also under a policy's ``<name>/`` prefix); other values as rank 0 has them."""
    if not is_distributed():
        return metrics
    everyone = gather(metrics)
    merged = dict(everyone[0])
    for key, value in merged.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [m[key] for m in everyone if isinstance(m.get(key), (int, float))]
            merged[key] = _reduction(key)(values)
    return merged


def _reduction(key: str):
    if key.endswith(_MIN_METRICS):
        return min
    if key.endswith(_MAX_METRICS):
        return max
    return _mean


def _mean(values: list) -> float:
    return sum(values) / len(values)


def cat_tensors(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` concatenated in rank order (e.g. scores for running statistics)."""
    if not is_distributed():
        return tensor
    return torch.cat([t.to(tensor.device) for t in gather(tensor.detach().cpu())])


def cat_rows(*tensors: torch.Tensor | None) -> tuple[list, slice]:
    """Each tensor concatenated over ranks along dim 0 in rank order (one gather), and the rows that are this
    rank's. 2-D tensors (per-token values and their response mask) are right-padded with zeros to the widest
    rank's: the padding is masked. None stays None."""
    if not is_distributed():
        rows = next(t.shape[0] for t in tensors if t is not None)
        return list(tensors), slice(0, rows)
    everyone = gather([None if t is None else t.detach().cpu() for t in tensors])
    rows = [next(t.shape[0] for t in parts if t is not None) for parts in everyone]
    start = sum(rows[:rank()])
    merged = [None if t is None else _cat_padded([parts[i] for parts in everyone]).to(t.device)
              for i, t in enumerate(tensors)]
    return merged, slice(start, start + rows[rank()])


def _cat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    if parts[0].dim() == 1:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    out = parts[0].new_zeros((sum(p.shape[0] for p in parts), width, *parts[0].shape[2:]))
    start = 0
    for part in parts:
        out[start:start + part.shape[0], :part.shape[1]] = part
        start += part.shape[0]
    return out
