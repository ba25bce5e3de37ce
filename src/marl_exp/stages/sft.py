"""Stage 1, supervised fine-tuning with TRL's SFTTrainer (full or LoRA, any quant mode).

Output: ``<run_dir>/model`` — a standalone model + tokenizer (LoRA is merged into an fp32 copy of
the base, so later stages always start from a plain checkpoint), and ``adapter/`` for LoRA runs.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel, prepare_model_for_kbit_training
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from trl.data_utils import is_conversational

from marl_exp.config import sft_finetune_mode
from marl_exp.data import build_task, chat, loaders
from marl_exp.data.checks import fit_sft_texts
from marl_exp.modeling.loading import load_model, load_tokenizer, resolve_device, resolve_model_path
from marl_exp.run import distributed
from marl_exp.run.interrupt import StopOnSignalCallback, stop_on_signal
from marl_exp.run.tracking import Tracker, TrackerCallback
from marl_exp.stages.common import count_parameters, lora_config, trainer_kwargs, upcast_trainable_to_fp32

log = logging.getLogger(__name__)
MODEL_SUBDIR = "model"


def run(cfg, run_dir: Path, tracker: Tracker) -> dict:
    # SIGINT/SIGTERM stop training at the end of the current step; nothing is saved (the stage is
    # short: resuming it = rerunning it) and StageInterrupted is raised, so no summary marks it done.
    with stop_on_signal() as stop:
        return _run(cfg, run_dir, tracker, stop)


def _run(cfg, run_dir: Path, tracker: Tracker, stop) -> dict:
    device = resolve_device(cfg.device)
    base_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(base_path, cfg.model)
    task = build_task(cfg.data)
    # Conversations (TRL's formats) go through the chat template; without one this fails before loading.
    conversational = is_conversational(task.sft_train[0])
    chat.apply_template(tokenizer, cfg.data, conversational)
    # The chat template's new embedding rows (resize_token_embeddings samples them) and a LoRA (made before
    # SFTTrainer seeds) draw from the global random state: seed it, or two runs of one config differ.
    set_seed(cfg.seed)
    model = load_model(base_path, cfg.model, cfg.quant, device)
    added = chat.add_template_tokens(model, tokenizer) if conversational else []
    # Counted with the template's tokens added (each one token) and before training: SFTTrainer cuts long
    # examples to max_length in silence, and drops those left with nothing to train.
    sft_train, sft_eval = (fit_sft_texts(texts, tokenizer, cfg.stage.max_length, cfg.data.on_bad_row,
                                         f"{task.name} {split} SFT examples",
                                         partial(loaders.row_names, cfg.data, "sft", split))
                           for split, texts in (("train", task.sft_train), ("eval", task.sft_eval)))

    peft_config = None
    if sft_finetune_mode(cfg) == "lora":
        peft_config = lora_config(cfg.adapter, task_type="CAUSAL_LM")
        if added:  # LoRA alone would leave the new tokens' embeddings untrained
            train_new_tokens(peft_config, model, tokenizer.convert_tokens_to_ids(added))
        if cfg.quant.mode in ("8bit", "4bit"):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.stage.gradient_checkpointing)

    args = SFTConfig(**trainer_kwargs(cfg, run_dir / "trainer", device), packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=sft_train, eval_dataset=sft_eval,
                         processing_class=tokenizer, peft_config=peft_config,
                         callbacks=[TrackerCallback(tracker), StopOnSignalCallback(stop)])
    upcast_trainable_to_fp32(trainer.model)  # before train(): the optimizer is created there
    params = count_parameters(trainer.model)
    log.info("SFT: %d parameters, %d trainable", params["params/total"], params["params/trainable"])
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    stop.raise_if_requested("sft", trainer.state.global_step)
    metrics = trainer.evaluate()
    summary = {
        **params,
        "eval/loss_before": before,
        "eval/loss": metrics["eval_loss"],
        "eval/perplexity": math.exp(min(metrics["eval_loss"], 700.0)),  # exp(>709) overflows
        "train/steps": trainer.state.global_step,
    }
    if distributed.is_distributed():  # the trainer's own view: data parallel over this many processes
        summary["dist/trainer_processes"] = trainer.accelerator.num_processes
    if distributed.is_main():  # data parallel: the weights are the same on every rank
        _save(trainer.model, tokenizer, run_dir, base_path, cfg, conversational)
    tracker.update_summary(summary)
    return summary


def _save(model, tokenizer, run_dir: Path, base_path: str, cfg, conversational: bool = False) -> None:
    out = run_dir / MODEL_SUBDIR
    if isinstance(model, PeftModel):
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        # Merge into a full-precision copy of the base: merging into quantized weights would round them.
        base = load_model(base_path, cfg.model, _fp32(cfg.quant), torch.device("cpu"))
        if base.get_input_embeddings().num_embeddings < len(tokenizer):  # the chat template's added tokens
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, run_dir / "adapter").merge_and_unload()
    if conversational:  # the reply ends at the template's end-of-turn token: say so where generate() looks
        chat.stop_at_end_of_turn(model.generation_config, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("SFT model saved to %s", out)


def train_new_tokens(peft_config, model, token_ids: list[int]) -> None:
    """Let LoRA SFT train tokens added to the vocabulary: their input-embedding rows (peft's
    ``trainable_token_indices``) and, when not tied to them, the output embeddings whole (``modules_to_save``:
    TRL's fused LM head reads the plain weight, which peft's token wrapper does not expose)."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    peft_config.trainable_token_indices = {names[inputs]: list(token_ids)}
    if outputs is not None and outputs.weight is not inputs.weight:
        peft_config.modules_to_save = [*(peft_config.modules_to_save or []), names[outputs]]


def _fp32(quant_cfg):
    from omegaconf import OmegaConf

    quant = OmegaConf.to_container(quant_cfg)
    quant["mode"] = "fp32"
    return OmegaConf.create(quant)
