"""Stage 2, the reward adapter: TRL's RewardTrainer with a LoRA config on the SFT model.

Output: ``<run_dir>/reward_adapter`` — a PEFT adapter dir whose score head (``score``) is saved with
it (peft's ``modules_to_save``), plus ``marl_exp_base.json`` recording the base it was trained on.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from peft import prepare_model_for_kbit_training
from transformers import set_seed
from trl import RewardConfig, RewardTrainer
from trl.data_utils import is_conversational

from marl_exp.config import ConfigError
from marl_exp.data import build_task, chat, loaders
from marl_exp.data.checks import fit_pairs, warn_if_few_held_out
from marl_exp.modeling.loading import load_model, load_tokenizer, local_model_dir, resolve_device
from marl_exp.modeling.multi_adapter import disable_dropout
from marl_exp.provenance import write_base_record
from marl_exp.run import distributed
from marl_exp.run.interrupt import StopOnSignalCallback, stop_on_signal
from marl_exp.run.tracking import Tracker, TrackerCallback
from marl_exp.stages.common import count_parameters, lora_config, trainer_kwargs, upcast_trainable_to_fp32

log = logging.getLogger(__name__)
ADAPTER_SUBDIR = "reward_adapter"


def run(cfg, run_dir: Path, tracker: Tracker, sft_model: str) -> dict:
    # SIGINT/SIGTERM stop training at the end of the current step; nothing is saved (the stage is
    # short: resuming it = rerunning it) and StageInterrupted is raised, so no summary marks it done.
    with stop_on_signal() as stop:
        return _run(cfg, run_dir, tracker, sft_model, stop)


def _run(cfg, run_dir: Path, tracker: Tracker, sft_model: str, stop) -> dict:
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(sft_model, cfg.model)
    task = build_task(cfg.data, model_dir=sft_model)  # a task may make its pairs from this base's own replies
    # Conversational pairs: RewardTrainer renders them with the chat template (the SFT model's, or data.chat_template).
    conversational = is_conversational(task.pairs_train[0])
    chat.apply_template(tokenizer, cfg.data, conversational)
    if conversational and chat.missing_template_tokens(tokenizer):
        raise ConfigError(f"the chat template writes {chat.missing_template_tokens(tokenizer)}, which {sft_model} "
                          "does not have; train the reward adapter on an SFT model trained with this template")
    # Before the model loads: RewardTrainer would drop over-long pairs without a word.
    pairs_train, pairs_eval = (fit_pairs(pairs, tokenizer, cfg.stage.max_length, cfg.data.on_bad_row,
                                         f"{task.name} {split} preference pairs",
                                         partial(loaders.row_names, cfg.data, "pairs", split))
                               for split, pairs in (("train", task.pairs_train), ("eval", task.pairs_eval)))
    warn_if_few_held_out(len(pairs_eval), "pair", "pairwise accuracy", f"{task.name} eval preference pairs")
    # The score head (created by the load) and the LoRA (by RewardTrainer) draw from the global random state:
    # seed it, or the adapter depends on whatever the process drew before (a stage-cache build inside a PPO run).
    set_seed(cfg.seed)
    model = load_model(sft_model, cfg.model, cfg.quant, device, task="seq-cls", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier pools at the last non-pad token
    if cfg.quant.mode in ("8bit", "4bit"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.stage.gradient_checkpointing)

    args = RewardConfig(**trainer_kwargs(cfg, run_dir / "trainer", device),
                        center_rewards_coefficient=cfg.stage.center_rewards_coefficient)
    if args.disable_dropout:  # TRL zeroes nn.Dropout modules only; OPT's layers drop from a float attribute
        disable_dropout(model)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs_train, eval_dataset=pairs_eval,
                            processing_class=tokenizer, peft_config=lora_config(cfg.adapter, task_type="SEQ_CLS"),
                            callbacks=[TrackerCallback(tracker), StopOnSignalCallback(stop)])
    upcast_trainable_to_fp32(trainer.model)  # before train(): the optimizer is created there
    params = count_parameters(trainer.model)
    trainer.train()
    stop.raise_if_requested("reward", trainer.state.global_step)
    metrics = trainer.evaluate()
    accuracy = pairwise_accuracy(trainer.model, tokenizer, pairs_eval, cfg.stage.eval_batch_size)

    out = run_dir / ADAPTER_SUBDIR
    trainer.save_model(str(out))  # rank 0 only, in a data-parallel run
    if distributed.is_main():
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; the run dir has the config already
        tokenizer.save_pretrained(out)
        write_base_record(out, sft_model, cfg.model.name, local_model_dir(sft_model, cfg.model))
    summary = {**params, "eval/loss": metrics["eval_loss"], "eval/pairwise_accuracy": accuracy,
               "eval/margin": metrics.get("eval_margin"), "train/steps": trainer.state.global_step}
    if distributed.is_distributed():  # the trainer's own view: data parallel over this many processes
        summary["dist/trainer_processes"] = trainer.accelerator.num_processes
    log.info("reward adapter saved to %s (held-out pairwise accuracy %.3f)", out, accuracy)
    tracker.update_summary(summary)
    return summary


@torch.no_grad()
def sequence_scores(model, tokenizer, texts: list, batch_size: int) -> torch.Tensor:
    """Reward of each text from a sequence classifier, formatted as RewardTrainer trains it: plain text with
    EOS appended, a conversation (message list) rendered by the chat template."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start:start + batch_size]
        if chat.is_conversational(batch[0]):
            ids = [tokenizer.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"] for t in batch]
            inputs = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="right").to(device)
        else:
            inputs = tokenizer([t + tokenizer.eos_token for t in batch], return_tensors="pt", padding=True).to(device)
        scores.append(model(**inputs).logits[:, 0].float().cpu())
    model.train(was_training)
    return torch.cat(scores)


def pair_sides(pairs, side: str) -> list:
    """One side of each pair as RewardTrainer joins it: the shared ``prompt`` (when given) + the side."""
    sides = list(pairs[side])
    return [p + s for p, s in zip(pairs["prompt"], sides)] if "prompt" in pairs.column_names else sides


def pairwise_accuracy(model, tokenizer, pairs, batch_size: int) -> float:
    chosen = sequence_scores(model, tokenizer, pair_sides(pairs, "chosen"), batch_size)
    rejected = sequence_scores(model, tokenizer, pair_sides(pairs, "rejected"), batch_size)
    return (chosen > rejected).float().mean().item()
