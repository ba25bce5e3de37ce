"""What a run says on the console: a short plan at the start, one line per evaluation, the result at the end.

The full config goes to ``<run dir>/resolved_config.yaml`` (``python train.py --cfg job`` prints it without
running). Library noise that alarms without informing is filtered here (``quiet_libraries``), and progress
bars turn into a line every ``PROGRESS_EVERY_S`` seconds when the output is not a terminal
(``progress_as_lines``), instead of a few huge lines in a log file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

PROGRESS_EVERY_S = 30
MIB = 2**20
_quieted = False


def say(text: str) -> None:
    """Console output of the run (stdout: logs and results; errors go to stderr)."""
    print(text, flush=True)


# ----------------------------------------------------------------------------------------------- noise
class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class _ExpectedClassifierReport(logging.Filter):
    """transformers' load report when a causal LM checkpoint is loaded as a sequence classifier (the reward
    model): its LM head is unused and its score head is new. Expected, so dropped, and said once in words."""

    explained = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [row for row in rows if len(row) >= 2 and row[1] in ("MISSING", "UNEXPECTED")]
        expected = rows and all((status == "MISSING" and key.startswith("score.")) or
                                (status == "UNEXPECTED" and key.startswith("lm_head.")) for key, status, *_ in rows)
        if expected and not _ExpectedClassifierReport.explained:
            _ExpectedClassifierReport.explained = True
            logging.getLogger("marl_exp").info("reward model: the SFT model's LM head is unused and its score head "
                                               "starts from a random init (transformers' load report says so)")
        return not expected


def quiet_libraries() -> None:
    """Filter warnings that alarm without informing (before the libraries are imported).

    * bitsandbytes on a CPU with AVX512-BF16 tries to fetch an optional fused 4-bit *inference* kernel
      from the hub ("Failed to load CPU gemm_4bit_forward from kernels-community"); marl-exp keeps 4-bit
      weights in their trainable layout and never uses that kernel (``keep_4bit_weights_differentiable``).
    * transformers deprecates ``is_gradient_checkpointing``, which peft and TRL still read: nothing a user
      can change.
    * transformers' load report for the reward model (see ``_ExpectedClassifierReport``).
    * datasets' "Failed to load JSON from file" (logged twice, through its handler and Hydra's): the loader
      raises a one-line error with the same cause (``data.loaders._read_file``).
    Idempotent: each filter is added once.
    """
    global _quieted
    if _quieted:
        return
    _quieted = True
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        _DropMessages("Failed to load CPU gemm_4bit_forward"))
    for name in ("transformers.modeling_utils", "transformers.utils.loading_report"):
        logging.getLogger(name).addFilter(_ExpectedClassifierReport())
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("datasets.packaged_modules.json.json").addFilter(_DropMessages("Failed to load JSON from file"))


class ProgressLines(io.TextIOBase):
    """A text stream for logs: progress-bar redraws (``\\r<bar>``) become one line every ``every_s`` seconds.

    A bar that lives less than ``every_s`` prints nothing; a longer one prints a line every ``every_s``
    and its final state when it closes. Other text passes through unchanged.
    """

    def __init__(self, stream, every_s: float = PROGRESS_EVERY_S, clock=time.monotonic):
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self.column = 0  # characters of ordinary text on the current line
        self.pending: str | None = None  # the bar's latest state, not written yet
        self.bar_since: float | None = None  # when the current bar appeared
        self.bar_shown = False  # the current bar has printed at least one line
        self.last_line = 0.0

    def write(self, text: str) -> int:
        redraw = False
        for piece in re.split(r"(\r\n|\r|\n)", text):
            if piece == "\r":
                if self.column:  # ordinary text before a redraw: end its line
                    self._out("\n")
                redraw = True
            elif piece in ("\n", "\r\n"):
                if self.column:
                    self._out("\n")
                elif self.bar_since is not None:  # a bar closing (leave=True): its last state, if it showed
                    if self.pending and self.bar_shown:
                        self._out(self.pending + "\n")
                    self.pending, self.bar_since, self.bar_shown = None, None, False
                else:
                    self._out("\n")
                redraw = False
            elif piece and redraw:
                self._redraw(piece.rstrip())
            elif piece:
                self.pending = None  # text over a cleared bar (tqdm.write): the bar redraws after it
                self._out(piece)
        return len(text)

    def _redraw(self, state: str) -> None:
        if not state:  # a bar clearing itself
            return
        now = self.clock()
        if self.bar_since is None:
            self.bar_since, self.bar_shown = now, False
        self.pending = state
        if now - max(self.bar_since, self.last_line if self.bar_shown else self.bar_since) >= self.every_s:
            self._out(state + "\n")
            self.pending, self.bar_shown, self.last_line = None, True, now

    def _out(self, text: str) -> None:
        self.stream.write(text)
        self.column = 0 if text.endswith("\n") else self.column + len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def progress_as_lines() -> Iterator[None]:
    """When stderr is not a terminal (a log file, CI): progress bars as ``ProgressLines``, dataset-map bars off."""
    if sys.stderr.isatty():
        yield
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    previous, sys.stderr = sys.stderr, ProgressLines(sys.stderr)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = previous


# ----------------------------------------------------------------------------------------------- start
def _lora(adapter: DictConfig) -> str:
    targets = ",".join(adapter.target_modules)
    return f"LoRA r={adapter.r} alpha={adapter.lora_alpha} dropout={adapter.lora_dropout} on {targets}"


def _quant(quant: DictConfig) -> str:
    if quant.mode == "4bit":
        return f"4bit {quant.bnb_4bit_quant_type}, compute {quant.bnb_4bit_compute_dtype}"
    return str(quant.mode)


def _upstream(node: DictConfig, quant: DictConfig, name: str) -> str:
    """How the stage cache builds upstream ``name``: adapter, quant and schedule, with the keys to change them."""
    schedule = f"{node.max_steps} steps" if node.max_steps > 0 else f"{node.num_train_epochs:g} epochs"
    if name == "sft":
        finetune = node.finetune if node.finetune != "auto" else ("lora" if node.quant in ("8bit", "4bit") else "full")
        how = "full fine-tune" if finetune == "full" else _lora(node.adapter)
        weights = node.quant
    else:
        how = _lora(node.adapter)
        weights = f"{_quant(quant)} (same as quant)" if node.quant == "same" else node.quant
    return f"upstream.{name}: {how}, {weights}, {schedule}, lr {node.learning_rate:g}"


def precision(quant: DictConfig, bf16: tuple[bool | None, str], device: str, full_finetune: bool = False) -> str:
    """The plan's precision line: what is stored and computed in which dtype, the key that chose it, and what the
    device offers for bf16 (``run.hardware.native_bf16``: (native?, why), native None where it cannot tell).
    ``full_finetune``: an SFT stage training every weight (which it keeps in fp32 over any base dtype)."""
    text = {
        "fp32": "fp32 weights, adapters and compute",
        "bf16": "fp32 weights (every one is trained), bf16 matmuls under autocast" if full_finetune else
                "bf16 base weights and base matmuls; adapters, heads and optimizer state in fp32",
        "8bit": "8-bit base weights (bitsandbytes LLM.int8); adapters, heads and optimizer state in fp32",
        "4bit": f"4-bit base weights ({quant.bnb_4bit_quant_type}, compute {quant.bnb_4bit_compute_dtype}); adapters, "
                "heads and optimizer state in fp32",
    }[quant.mode] + f" (quant={quant.mode})"
    native, why = bf16
    if quant.mode == "fp32" and native:
        text += f"; {why}, for bf16 matmuls in hardware (quant=bf16)"
    if quant.mode == "bf16" and device == "cpu" and native is False:
        text += "; this CPU has no bf16 matmul instructions (amx_bf16, avx512_bf16): bf16 may be slower than fp32"
    return text


def plan(cfg: DictConfig, run_dir: Path, upstream: dict[str, tuple[str, str]], threads: str,
         precision_line: str | None = None) -> str:
    """The start block: what plays which role, where inputs come from, where outputs go.

    ``upstream`` maps an upstream stage to (path, status): status is "given", "cached" or "to build";
    ``precision_line``: ``precision(...)`` for the run's device.
    """
    stage = cfg.stage
    lines = [f"marl-exp: stage={stage.name} | model {cfg.model.path} | quant {_quant(cfg.quant)} | {threads}"]
    if precision_line:
        lines.append(f"  precision  {precision_line}")

    def source(name: str) -> str:
        path, status = upstream[name]
        if status == "given":
            return f"{path} (stage.{'sft_model' if name == 'sft' else 'reward_adapter'})"
        node = cfg.upstream[name]
        verb = "reused from the stage cache" if status == "cached" else "built now into the stage cache"
        return f"{path} ({verb}; {_upstream(node, cfg.quant, name)})"

    if stage.name == "sft":
        from marl_exp.config import sft_finetune_mode

        full = sft_finetune_mode(cfg) == "full"
        lines.append(f"  train      {'full fine-tune' if full else _lora(cfg.adapter)} of {cfg.model.path}")
    else:
        lines.append(f"  base       {source('sft')}")
    if stage.name == "reward":
        lines.append(f"  train      reward adapter: {_lora(cfg.adapter)} + score head")
    if stage.name in ("ppo", "grpo", "rloo", "reinforce_pp"):  # config.RL_STAGES (console stays import-light)
        critic = {"value_head": "value head", "adapter": "critic adapter + value head"}.get(
            stage.get("critic"), f"no critic ({stage.name})")
        policies = ", ".join(stage.policies)
        lines.append(f"  policy     {policies}: {_lora(cfg.adapter)} + {critic} (adapter.*)")
        lines.append("  reference  the base with every adapter off"
                     + (" (its own copy: stage.sharing=separate)" if stage.sharing == "separate" else ""))
        lines += _reward_lines(stage, source)
    lines.append(f"  run dir    {run_dir} (full config: resolved_config.yaml)")
    lines.append(f"  outputs    {Path(cfg.output_dir).expanduser().resolve()} (stage cache: cache/)")
    return "\n".join(lines)


def _reward_lines(stage: DictConfig, source) -> list[str]:
    """The reward: the upstream adapter (the default), or ``stage.rewards``' weighted sum, one line a source."""
    if not stage.get("rewards"):
        return [f"  reward     {source('reward')}"]
    from marl_exp.config import reward_sources

    sources = reward_sources(stage)
    lines = ["  reward     " + " + ".join(f"{s.weight:g} × {s.name}" for s in sources) + " (stage.rewards)"]
    for s in sources:
        what = f"function {s.function}" if s.function else f"adapter {s.adapter}" if s.adapter else source("reward")
        label = f", label {s.label_index}" if s.label_index else ""
        lines.append(f"    {s.name}: {what}{label}")
    return lines


def memory_line(parts: dict[str, int]) -> str:
    """``MultiAdapterModel.memory_footprint()`` (or any {part: bytes}) in MiB, one line."""
    shown = [f"{name.replace('_', ' ')} {value / MIB:.1f} MiB" for name, value in parts.items() if name != "total"]
    total = parts.get("total", sum(parts.values()))
    return f"memory: {', '.join(shown)} (total {total / MIB:.1f} MiB)" if shown else f"memory: {total / MIB:.1f} MiB"


# ------------------------------------------------------------------------------------------ evaluation
def source_weights(stage: DictConfig) -> dict[str, float] | None:
    """``stage.rewards`` as {source: weight}, in order; None for the default reward (the upstream adapter alone),
    which the plan, the evaluation lines and the final table show as one number."""
    if not stage.get("rewards"):
        return None
    from marl_exp.config import reward_sources

    return {source.name: source.weight for source in reward_sources(stage)}


def eval_line(tag: str, step: int, steps: int, values: dict[str, Any], policy: str | None = None,
              weights: dict[str, float] | None = None, judge: str = "well formed") -> str:
    """One line per evaluation: ``eval during step 20/200 [policy]: reward 0.53 | strict gold 0.48 | ... | length 14``;
    with ``weights`` (``source_weights``) the reward is followed by its sources: ``reward 2.658 = 1 × rm 2.658 +
    0.5 × great 0.000`` (each source's mean score, unweighted). ``judge`` names the share the task's judge accepts
    (``config.judge_label``)."""
    names = {"reward_score": "reward", "oracle_strict": "strict gold", "well_formed": judge,
             "on_task": "on task", "well_formed_on_task": f"{judge} and on task", "oracle_score": "oracle",
             "kl": "KL", "response_length": "length"}
    shown = [f"{label} {_number(values[key])}" for key, label in names.items() if key in values]
    if weights and shown and shown[0].startswith("reward "):
        shown[0] += " = " + _weighted_sum({name: (weight, values.get(f"rewards/{name}/mean"))
                                           for name, weight in weights.items()})
    who = f" [{policy}]" if policy else ""
    return f"eval {tag} step {step}/{steps}{who}: {' | '.join(shown)}"


def _weighted_sum(terms: dict[str, tuple[float, Any]]) -> str:
    """``1 × rm 2.658 + 0.5 × great 0.000``: weight × name, then the source's score (a negative weight as
    ``- 0.3 × name``)."""
    parts = []
    for name, (weight, value) in terms.items():
        sign = "-" if weight < 0 else "+" if parts else ""
        parts.append(f"{sign} {abs(weight):g} × {name} {_number(value) if value is not None else '-'}".lstrip())
    return " ".join(parts)


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


# ---------------------------------------------------------------------------------------------- result
def result(cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> str:
    """The end of a run: before -> after of the stage's metrics and where its outputs are."""
    stage = cfg.stage.name
    seconds = summary.get("time/total_s")
    took = "" if not isinstance(seconds, (int, float)) else \
        f" in {seconds:.0f} s" if seconds < 120 else f" in {seconds / 60:.1f} min"
    lines = [f"marl-exp: result of the {stage} stage{took}"]
    if stage in ("ppo", "grpo", "rloo", "reinforce_pp"):
        lines += _ppo_table(cfg, summary)
        files = "peft adapters + value_head.safetensors" if stage == "ppo" else "peft adapters"  # only PPO has a critic
        lines.append("  adapters   " + ", ".join(str(run_dir / "policies" / n) for n in cfg.stage.policies)
                     + f" ({files})")
        lines.append(f"  samples    marl-exp sample {run_dir}")
    elif stage == "reward":
        lines.append(_row("held-out pairwise accuracy", None, summary.get("eval/pairwise_accuracy")))
        lines.append(_row("held-out loss", None, summary.get("eval/loss")))
        lines.append(f"  adapter    {run_dir / 'reward_adapter'}")
    else:
        lines.append(_row("held-out loss", summary.get("eval/loss_before"), summary.get("eval/loss")))
        lines.append(f"  model      {run_dir / 'model'}")
    return "\n".join(line for line in lines if line)


def _row(label: str, before: Any, after: Any) -> str:
    if before is None and after is None:
        return ""
    return f"  {label:<26} {_number(before) if before is not None else '':>9} {'->' if before is not None else '  '} " \
           f"{_number(after) if after is not None else '':>9}"


def _ppo_table(cfg: DictConfig, summary: dict[str, Any]) -> list[str]:
    from marl_exp.config import judge_label

    labels = {"reward_score": "reward", "oracle_strict": "strict gold (oracle_strict)",
              "well_formed": judge_label(cfg.data.name).replace(" ", "-") + " share",  # well-formed share
              "on_task": "on-task share", "well_formed_on_task": "both (judge and on task)",
              "oracle_score": "oracle score", "kl": "KL to reference (nats)",
              "response_length": "response length"}
    lines = [f"  {'':<26} {'before':>9}    {'after':>9}"]
    policies = list(cfg.stage.policies)
    for policy in policies:
        prefix = "" if len(policies) == 1 else f"{policy}/"
        if len(policies) > 1:
            lines.append(f"  [{policy}]")
        for key, label in labels.items():
            lines.append(_row(label, summary.get(f"eval/before/{prefix}{key}"), summary.get(f"eval/after/{prefix}{key}")))
            if key == "reward_score":  # the sources right under their weighted sum, each unweighted
                for name, weight in (source_weights(cfg.stage) or {}).items():
                    source = f"rewards/{name}/mean"
                    lines.append(_row(f"  {weight:g} × {name}", summary.get(f"eval/before/{prefix}{source}"),
                                      summary.get(f"eval/after/{prefix}{source}")))
    return lines
