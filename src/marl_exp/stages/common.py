"""What the stages share: trainer arguments, LoRA configs and output records. ``cfg`` is the whole config."""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import LoraConfig

from marl_exp.provenance import BUILTIN_PREFIX


TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets",
                    "hydra-core", "omegaconf", "wandb")


def lora_config(adapter_cfg, task_type: str) -> LoraConfig:
    targets = list(adapter_cfg.target_modules)
    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.lora_alpha,
        lora_dropout=adapter_cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias=adapter_cfg.bias,
        task_type=task_type,
    )


def adapts_output_layer(cfg: DictConfig) -> bool:
    """Whether policy adapters put LoRA on the output layer (``adapter.output_layer``; null = the tiny model)."""
    choice = cfg.adapter.output_layer
    return cfg.model.path == f"{BUILTIN_PREFIX}tiny" if choice is None else bool(choice)


def policy_lora_config(cfg: DictConfig, base) -> LoraConfig:
    """The LoRA config of a policy (or critic) adapter on ``base``: ``adapter``, plus the output layer when
    ``adapts_output_layer``, spelled as the names of every linear layer (peft's all-linear skips it)."""
    lora = lora_config(cfg.adapter, task_type="CAUSAL_LM")
    if adapts_output_layer(cfg):
        output = next(name for name, module in base.named_modules() if module is base.get_output_embeddings())
        if lora.target_modules == "all-linear":
            linear = {name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                      if isinstance(module, torch.nn.Linear)}
            lora.target_modules = sorted(linear | {output})
        else:
            lora.target_modules = sorted(set(lora.target_modules) | {output})
    return lora


def trainer_kwargs(cfg: DictConfig, output_dir: Path, device: torch.device) -> dict:
    """Arguments shared by TRL's SFTConfig and RewardConfig, from the stage config."""
    stage = cfg.stage
    return dict(
        output_dir=str(output_dir),
        learning_rate=stage.learning_rate,
        weight_decay=stage.weight_decay,
        warmup_steps=float(stage.warmup_ratio),  # transformers 5: a float < 1 is a ratio of all steps
        lr_scheduler_type=stage.lr_scheduler_type,
        num_train_epochs=stage.num_train_epochs,
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.eval_batch_size,
        max_length=stage.max_length,
        logging_steps=stage.logging_steps,
        activation_checkpointing=stage.gradient_checkpointing,  # transformers 5 name of gradient_checkpointing
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device.type == "cpu",
        # bf16 mixed precision, on a CPU too: the fp32 adapters and heads (upcast_trainable_to_fp32) receive
        # the bf16 base's hidden states, and only autocast runs their matmuls on both.
        bf16=cfg.quant.mode == "bf16",
        report_to="none",  # our TrackerCallback forwards logs to W&B and metrics.jsonl
        save_strategy="no",  # the stage saves its own output; checkpoints are its own business
        eval_strategy="no",
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=False,
    )



def environment_record() -> dict:
    versions = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
            "git": git_record()}


def git_record(repo: Path | None = None) -> dict | None:
    """Commit and dirty flag (tracked files changed) of the project's git checkout; None without git."""
    import subprocess

    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[3]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        if git("rev-parse", "--is-inside-work-tree") != "true":
            return None
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception:  # noqa: BLE001 - no git binary, not a checkout, no commit yet, a timeout: no record
        return None


def count_parameters(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params/total": total, "params/trainable": trainable}


def upcast_trainable_to_fp32(model) -> None:
    """TRL casts trainable weights of quantized models to bf16, and peft keeps ``modules_to_save`` (the
    score head) in the base dtype; keep every trainable weight, and so its optimizer state, in fp32. Over a
    bf16 base the forward then needs autocast (``bf16=True`` in ``trainer_kwargs``)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
