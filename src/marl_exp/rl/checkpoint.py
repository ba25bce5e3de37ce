"""RL checkpoints: policy adapters + value heads, optimizer, the algorithm's state (PPO: KL controller), RNG and step.

Each checkpoint is built in a temp dir and renamed into place, and carries a manifest of file
hashes: a half-written or corrupted checkpoint is detected and skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from marl_exp.io import atomic_write_json, read_json
from marl_exp.modeling.multi_adapter import VALUE_HEAD_FILE
from marl_exp.run import distributed

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE_FILE = "trainer_state.pt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(run_dir: Path, step: int, model, adapters: list[str], trainer_state: dict, summary: dict,
                    value_heads: bool = True) -> Path:
    final = Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in adapters:
        model.save_policy(tmp / "policies" / name, adapter=name, value_head=value_heads)
    torch.save({"trainer": trainer_state, "summary": summary}, tmp / STATE_FILE)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    atomic_write_json(tmp / MANIFEST, {"step": step, "files": {str(p.relative_to(tmp)): _sha256(p) for p in files}})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def is_complete(checkpoint: Path) -> bool:
    """True when the manifest exists and every file matches its recorded hash."""
    try:
        manifest = read_json(checkpoint / MANIFEST)
        return all(_sha256(checkpoint / rel) == digest for rel, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint in ``run_dir``; corrupt ones are skipped with a warning."""
    for checkpoint in sorted((Path(run_dir) / CHECKPOINTS).glob("step-*"), reverse=True):
        if is_complete(checkpoint):
            return checkpoint
        log.warning("skipping incomplete or corrupt checkpoint %s", checkpoint)
    return None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        found = latest_checkpoint(run_dir)
        if found is None:
            log.info("resume=auto: no complete checkpoint in %s, starting from scratch", run_dir)
        return found
    path = Path(resume)
    if not is_complete(path):
        raise ValueError(f"stage.resume={resume!r} is not a complete checkpoint (missing or corrupt {MANIFEST}); "
                         "give a checkpoints/step-* dir or use stage.resume=auto")
    return path


def checkpoint_step(checkpoint: Path | None) -> int | None:
    """The step a checkpoint was saved at (from its manifest); None for no checkpoint."""
    if checkpoint is None:
        return None
    return int(read_json(Path(checkpoint) / MANIFEST)["step"])


def load_checkpoint(checkpoint: Path, model, adapters: list[str]) -> tuple[dict, dict]:
    """Load adapter and value-head weights into ``model``; return (trainer state, summary so far).

    A policy without a value head file is one of a critic-free stage, which trains none."""
    for name in adapters:
        directory = checkpoint / "policies" / name
        weights = load_file(directory / "adapter_model.safetensors", device=str(model.device))
        set_peft_model_state_dict(model.peft_model, weights, adapter_name=name)
        if (directory / VALUE_HEAD_FILE).is_file():
            model.value_heads[name].load_state_dict(load_file(directory / VALUE_HEAD_FILE, device=str(model.device)))
    state = torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu")
    return state["trainer"], state["summary"]


# ---------------------------------------------------------------- data parallel: one writer, every rank's state
def save_checkpoint_on_main(run_dir: Path, step: int, model, adapters: list[str], trainer,
                            summary: dict) -> Path:
    """Rank 0 writes the checkpoint, with every rank's random state so a resume samples as before."""
    state = trainer.state_dict()
    rank_states = distributed.gather({key: state[key] for key in RANK_STATE_KEYS})
    path = None
    if distributed.is_main():
        if distributed.is_distributed():
            state["rank_states"] = rank_states
        path = save_checkpoint(run_dir, step, model, adapters, state, summary, value_heads=trainer.critic != "none")
    distributed.barrier()
    return distributed.broadcast(path)


# The parts of the trainer's state that differ between ranks (each samples its own prompts).
RANK_STATE_KEYS = ("prompt_rng", "shuffle_gen", "torch_rng", "cuda_rng")


def own_rank_state(state: dict, fresh: dict) -> dict:
    """This rank's random state from a checkpoint (rank 0's in a plain run); ``fresh`` = this rank's new
    trainer state, whose seeds are used when the checkpoint came from another number of processes."""
    rank_states = state.pop("rank_states", None)
    if not distributed.is_distributed():
        return state
    if rank_states is None or len(rank_states) != distributed.world_size():
        log.warning("the checkpoint was written by %d process(es), this run has %d: ranks other than 0 sample "
                    "with fresh seeds", len(rank_states or [None]), distributed.world_size())
        return state if distributed.is_main() else {**state, **{k: fresh[k] for k in RANK_STATE_KEYS}}
    return {**state, **rank_states[distributed.rank()]}
