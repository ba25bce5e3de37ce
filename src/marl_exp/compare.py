"""``marl-exp compare PATH...``: compare runs offline, from their run dirs (no W&B needed).

A PATH is a run dir (it holds ``summary.json``, ``resolved_config.yaml`` or a ``FAILED`` marker) or any
dir above run dirs, e.g. a multirun dir, which expands to its job dirs. Each run's ``summary.json``,
``metrics.jsonl`` and ``resolved_config.yaml`` (the effective config, every default included) are read.

- The table has one row per run: its status (``ok``, ``FAILED``, ``interrupted``, ``incomplete``,
  ``running``) and last logged step, the config values that **differ** between the compared runs
  (so fp32 shows as ``quant.mode=fp32``, not as a missing override) and the chosen final metrics,
  sorted by one of them (best first). By default an RL run's headline comes first (``headline``): the
  task's strict gold where the task has a judge and the run trains on the task's own reward, else the
  weighted reward, followed by each reward source's score. A metric no run has is named on stderr.
- ``--group`` puts runs that differ only in ``seed`` in one row: mean ± std over the seeds, and ``n``.
- ``--plot out.png`` draws learning curves labelled by the differing values, one panel per curve some run
  logged (titled by the keys it draws), at most three to a row; ``--smooth 0.6`` adds an exponential moving
  average (raw curve faint, smoothed bold, as dashboards draw them); with ``--group`` each group is its
  mean with a ± std band. Evaluation metrics, a few points each, are drawn as markers.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from marl_exp.run import records

FAILURE_MARKER = records.FAILURE_MARKER
SUMMARY = records.SUMMARY
RESOLVED_CONFIG = "resolved_config.yaml"
# Final metrics shown by default (those that exist in at least one run), in this order.
DEFAULT_METRICS = ("eval/after/oracle_strict", "eval/after/well_formed", "eval/after/oracle_score",
                   "eval/after/reward_score", "eval/after/kl", "eval/pairwise_accuracy", "eval/loss", "time/total_s")
# An RL run's headline: the task's judge (the strict gold), or the weighted reward trained on.
JUDGE, WEIGHTED_REWARD = "eval/after/oracle_strict", "eval/after/reward_score"
SOURCE_SCORE = re.compile(r"^eval/after/rewards/([^/]+)/mean$")  # each reward source's held-out mean score
# Metrics where lower is better (the table sorts best first).
LOWER_IS_BETTER = re.compile(r"(^|/)(loss|kl|perplexity)$|^time/|_s$")


@dataclass(frozen=True)
class Curve:
    title: str  # what it shows; the panel's title adds the logged keys it draws (``panel_title``)
    pattern: re.Pattern
    evaluation: bool = False  # a few points (every eval_every steps): markers, no smoothing


def _evaluation(metric: str) -> re.Pattern:
    return re.compile(rf"^eval/(before|during|after)/{metric}$")


# Learning-curve panels: which keys of metrics.jsonl each one draws (each reward source's are added per run,
# ``source_curves``).
CURVES = (
    # PPO logs env/reward_mean, the critic-free stages TRL's name: reward.
    Curve("reward", re.compile(r"^(env/reward_mean|reward)$")),
    Curve("held-out reward", _evaluation("reward_score"), True),
    Curve("strict gold", _evaluation("oracle_strict"), True),
    Curve("well formed", _evaluation("well_formed"), True),
    Curve("oracle score", _evaluation("oracle_score"), True),
    Curve("KL", re.compile(r"^objective/kl$")),
    Curve("train/loss", re.compile(r"^train/loss$")),
    Curve("eval/loss", re.compile(r"^eval/loss$"), True),
)
PANELS_PER_ROW = 3
# Config keys that say where a run went, not what it computed: never a difference worth a column.
BOOKKEEPING_KEYS = ("stage.resume", "run_name", "output_dir", "logger")
BOOKKEEPING_PREFIXES = ("logger.",)
SEED = "seed"
# Directories inside a run that never hold other runs.
_SKIP_DIRS = {".hydra", "wandb", "checkpoints", "policies", "model", "reward_adapter", "cache", ".submitit"}


@dataclass
class Run:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # resolved_config.yaml, flattened: "adapter.r": 8
    status: str = "incomplete"
    last_step: int | None = None
    error: str = ""
    label: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAILED"

    @property
    def settings(self) -> dict[str, Any]:
        """What the run ran with: its effective config, or its overrides for a run dir without one."""
        return self.config or self.overrides

    def value(self, key: str) -> Any:
        """``key``'s effective value; for a config group chosen on the command line (``quant=4bit``),
        the option's name."""
        return self.config[key] if key in self.config else self.overrides.get(key)


# ------------------------------------------------------------------------------------------ discovery
def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in (SUMMARY, FAILURE_MARKER, RESOLVED_CONFIG))


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run dirs under ``paths`` (each path itself, when it is a run dir), without duplicates, in order."""
    found: list[Path] = []
    for raw in paths:
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{raw}: no such directory")
        if is_run_dir(root):
            found.append(root)
            continue
        under: list[Path] = []
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if here != root and is_run_dir(here):
                under.append(here)
                dirnames[:] = []  # a run's subdirs (checkpoints, wandb, ...) are not runs
                continue
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        found.extend(sorted(under, key=_natural_key))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


# --------------------------------------------------------------------------------------------- loading
def load_run(path: Path) -> Run:
    run = Run(path=Path(path))
    run.summary = records.read_summary(run.path)
    run.metrics = records.read_metrics(run.path)
    run.overrides = read_overrides(run.path)
    run.config = read_config(run.path)
    run.status = records.run_status(run.path, run.summary)
    run.last_step = records.last_step(run.metrics)
    marker = run.path / FAILURE_MARKER
    if marker.is_file():
        text = marker.read_text(errors="replace")
        run.error = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return run


def read_overrides(run_dir: Path) -> dict[str, str]:
    """``.hydra/overrides.yaml`` as {key: value} ("+adapter.r=8" → "adapter.r": "8"; "~key" → "<deleted>")."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    result: dict[str, str] = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        text = str(item)
        if text.startswith("~"):
            result[text[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, _, value = text.lstrip("+").partition("=")
        result[key] = value
    return result


def read_config(run_dir: Path) -> dict[str, Any]:
    """``resolved_config.yaml`` flattened to dotted keys ({} when missing or unreadable)."""
    import yaml

    try:
        config = yaml.safe_load((Path(run_dir) / RESOLVED_CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return flatten(config) if isinstance(config, dict) else {}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = [load_run(path) for path in find_run_dirs(paths)]
    _label(runs)
    return runs


def _label(runs: list[Run]) -> None:
    """Short unique names: the path below the dirs all runs share (the job number in a multirun)."""
    if not runs:
        return
    resolved = [run.path.resolve() for run in runs]
    common = Path(os.path.commonpath([str(p) for p in resolved])) if len(runs) > 1 else resolved[0].parent
    for run, path in zip(runs, resolved):
        label = str(path.relative_to(common)) if path != common else path.name
        run.label = label or path.name


# -------------------------------------------------------------------------------------- differences
def _is_bookkeeping(key: str) -> bool:
    return key in BOOKKEEPING_KEYS or key.startswith(BOOKKEEPING_PREFIXES)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose effective value is not the same in every run. One run: the keys it overrode."""
    if len(runs) == 1:
        return [key for key in runs[0].overrides if not _is_bookkeeping(key)]
    keys: list[str] = []
    for run in runs:
        keys.extend(key for key in run.settings if key not in keys and not _is_bookkeeping(key))
    return [key for key in keys if len({_text(run.value(key)) for run in runs}) > 1]



def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """The stage's main metrics that some run has: the runs' headline first (``headline``; the weighted
    reward when any run's is), each reward source's score after the weighted reward."""
    present = set().union(*(run.summary for run in runs)) if runs else set()
    heads = {headline(run) for run in runs} - {None}
    lead = WEIGHTED_REWARD if WEIGHTED_REWARD in heads else next(iter(heads), None)
    metrics = [lead] * bool(lead) + [key for key in DEFAULT_METRICS if key in present and key != lead]
    sources = sorted((key for key in present if SOURCE_SCORE.match(key)), key=_source_order(runs))
    if sources and [SOURCE_SCORE.match(key).group(1) for key in sources] != ["reward"]:  # not only the default
        at = metrics.index(WEIGHTED_REWARD) + 1
        metrics[at:at] = sources
    return metrics


def headline(run: Run) -> str | None:
    """An RL run's main metric: the task's judge (the strict gold) where the task has one and the reward is
    the task's own (the upstream reward adapter, marl-exp's gold functions); the weighted reward where the
    run brings a reward of its own (an adapter or function source of ``stage.rewards``), or the task has no
    judge. None for other stages."""
    if JUDGE in run.summary and not own_reward_sources(run):
        return JUDGE
    return WEIGHTED_REWARD if WEIGHTED_REWARD in run.summary else None


def own_reward_sources(run: Run) -> list[str]:
    """The ``stage.rewards`` sources a run brings itself: an adapter path, or a function outside marl-exp."""
    own = []
    for key, value in run.config.items():
        match = re.fullmatch(r"stage\.rewards\.([^.]+)\.(adapter|function)", key)
        if match and value and not (match.group(2) == "function" and str(value).startswith("marl_exp.")):
            own.append(match.group(1))
    return own


def _source_order(runs: Sequence[Run]):
    """Sort key: a source's place in the first run's ``stage.rewards`` that has it."""
    order = list(dict.fromkeys(key.split(".")[2] for run in runs for key in run.config
                               if key.startswith("stage.rewards.") and key.count(".") >= 3))
    return lambda key: (order.index(name) if (name := SOURCE_SCORE.match(key).group(1)) in order else len(order), key)


def unknown_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> list[str]:
    """A line for each of ``metrics`` that no run's summary has, with the summary keys it may mean."""
    present = sorted(set().union(*(run.summary for run in runs)))
    lines = []
    for metric in dict.fromkeys(metrics):
        if metric in present:
            continue
        close = [key for key in present if key.endswith("/" + metric)] or difflib.get_close_matches(metric, present)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the keys of a run's summary.json"
        lines.append(f"marl-exp compare: no run has the metric {metric!r}{hint}")
    return lines


# --------------------------------------------------------------------------------------------- groups
@dataclass
class Group:
    """Runs that differ only in seed: one setting, several seeds."""

    runs: list[Run]
    setting: dict[str, Any]

    def values(self, metric: str) -> list[float]:
        return [float(v) for v in (run.summary.get(metric) for run in self.runs) if _is_number(v) and math.isfinite(v)]

    def mean(self, metric: str) -> float | None:
        values = self.values(metric)
        return statistics.fmean(values) if values else None

    def std(self, metric: str) -> float | None:
        """Sample standard deviation over the seeds (n - 1); None below two values."""
        values = self.values(metric)
        return statistics.stdev(values) if len(values) > 1 else None

    @property
    def status(self) -> str:
        counts: dict[str, int] = {}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return ",".join(f"{n}{status}" if len(counts) > 1 else status for status, n in counts.items())


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """One group per combination of the differing ``keys`` but the seed, in order of first appearance."""
    by_setting: dict[tuple, Group] = {}
    for run in runs:
        setting = {key: run.value(key) for key in keys if key != SEED}
        marker = tuple(_text(v) for v in setting.values())
        by_setting.setdefault(marker, Group(runs=[], setting=setting)).runs.append(run)
    return list(by_setting.values())


# ---------------------------------------------------------------------------------------------- tables
def build_table(runs: Sequence[Run], metrics: Sequence[str] | None = None, sort: str | None = None,
                group: bool = False) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (raw values; None = missing). ``sort``: a metric, best first (the first metric by
    default, ``none`` for the order of the paths). ``group``: one row per setting, mean ± std over seeds."""
    metrics = list(metrics) if metrics else default_metrics(runs)
    columns = differing_keys(runs)
    sort_key = metrics[0] if sort is None and metrics else (None if sort in (None, "none") else sort)
    if group:
        columns = [key for key in columns if key != SEED]
        groups = group_runs(runs, columns)
        if sort_key:
            groups = _sorted(groups, lambda g: g.mean(sort_key), sort_key)
        header = ["run", "status", "n", *columns, *metrics]
        rows = [[_group_label(g), g.status, len(g.runs), *(g.setting.get(k) for k in columns),
                 *(MeanStd(g.mean(m), g.std(m)) if g.mean(m) is not None else None for m in metrics)]
                for g in groups]
        return header, rows
    if sort_key:
        runs = _sorted(list(runs), lambda r: r.summary.get(sort_key), sort_key)
    header = ["run", "status", "step", *columns, *metrics]
    rows = []
    for run in runs:
        row: list[Any] = [run.label, run.status, run.last_step]
        row += [run.value(key) for key in columns]
        row += [run.summary.get(metric) for metric in metrics]
        rows.append(row)
    return header, rows


def _sorted(items: list, value_of, metric: str) -> list:
    """Best first by ``metric`` (descending, or ascending for losses, KL and times); missing values last."""
    lower = bool(LOWER_IS_BETTER.search(metric))
    present = [i for i in items if _is_number(value_of(i)) and math.isfinite(value_of(i))]
    missing = [i for i in items if i not in present]
    return sorted(present, key=value_of, reverse=not lower) + missing


def _group_label(group: Group) -> str:
    return group.runs[0].label if len(group.runs) == 1 else "+".join(run.label for run in group.runs)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float | None

    def __str__(self) -> str:
        return _cell(self.mean) + (f" ± {_cell(self.std)}" if self.std is not None else "")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return _text(value)
    return str(value)


def format_table(header: list[str], rows: list[list[Any]], fmt: str = "table") -> str:
    if fmt == "csv":  # full precision; a mean ± std cell becomes two columns
        split = [i for i, _ in enumerate(header) if any(isinstance(row[i], MeanStd) for row in rows)]
        out_header = [h for i, h in enumerate(header) for h in ([h, f"{h} std"] if i in split else [h])]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(out_header)
        for row in rows:
            cells = []
            for i, value in enumerate(row):
                if i in split:
                    cells += [value.mean, value.std] if isinstance(value, MeanStd) else [value, None]
                else:
                    cells.append(_text(value) if isinstance(value, list) else value)
            writer.writerow(["" if value is None else value for value in cells])
        return buffer.getvalue()
    cells = [[_cell(value) for value in row] for row in rows]
    if fmt == "markdown":
        def line(values):
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
        numeric = [i >= 2 and all(_is_number(row[i]) or isinstance(row[i], MeanStd) for row in rows
                                  if row[i] is not None) for i in range(len(header))]
        rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
        return "\n".join([line(header), rule, *(line(row) for row in cells)]) + "\n"
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; use table, markdown or csv")
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(header)]
    def line(values):
        return "  ".join(value.ljust(width) for value, width in zip(values, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in cells)]) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def failure_notes(runs: Sequence[Run]) -> str:
    notes = [f"  {run.label}: {run.error}" for run in runs if run.failed and run.error]
    return ("failed runs:\n" + "\n".join(notes) + "\n") if notes else ""


# ---------------------------------------------------------------------------------------------- plots
def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with the start-up bias removed (TensorBoard's smoothing): a smoothed
    point is sum_i w^(t-i) (1-w) x_i / (1 - w^(t+1)), so the first point is the first value."""
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing weight {weight!r} must be in [0, 1)")
    smoothed, last = [], 0.0
    for t, value in enumerate(values, start=1):
        last = weight * last + (1 - weight) * value
        smoothed.append(last / (1 - weight ** t))
    return smoothed


def plot_curves(runs: Sequence[Run], out: str | Path, smooth: float = 0.0, group: bool = False) -> Path:
    """Draw the learning curves (``draw_curves``) into ``out``."""
    import matplotlib.pyplot as plt

    fig = draw_curves(runs, smooth=smooth, group=group)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_curves(runs: Sequence[Run], smooth: float = 0.0, group: bool = False):
    """A figure with one panel per learning curve that some run logged; one line per run (or per seed
    group: its mean and a ± std band), labelled by the differing config values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = differing_keys(runs)
    lines = [(g.runs, _legend(g.setting, len(g.runs))) for g in group_runs(runs, keys)] if group else \
        [([run], _legend({k: run.value(k) for k in keys}, None) if keys else run.label) for run in runs]
    panels = []
    for curve in (CURVES[0], *source_curves(runs), *CURVES[1:]):
        series = [(members, label, [_curve(run, curve.pattern) for run in members]) for members, label in lines]
        if any(points for _, _, per_run in series for points in per_run):  # a panel with no data is left out
            panels.append((curve, series))
    n = max(len(panels), 1)
    columns = min(n, PANELS_PER_ROW)
    rows = math.ceil(n / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    axes = list(grid.flat)
    for spare in axes[n:]:
        fig.delaxes(spare)
    colours = plt.get_cmap("tab10")
    for ax, (curve, series) in zip(axes, panels):
        for index, (members, label, per_run) in enumerate(series):
            if not any(per_run):
                continue
            colour = colours(index % 10)
            status = {run.status for run in members}
            style = "--" if "FAILED" in status else ":" if status - {"ok"} else "-"
            label += "".join(f" ({s})" for s in sorted(status - {"ok"}))
            steps, mean, std = _mean_curve(per_run)
            if curve.evaluation:  # a few points: markers, joined thinly, never smoothed
                ax.plot(steps, mean, marker="o", markersize=4, linewidth=1, linestyle=style, color=colour, label=label)
                if group and any(s is not None for s in std):
                    ax.errorbar(steps, mean, yerr=[s or 0.0 for s in std], fmt="none", ecolor=colour, capsize=2,
                                alpha=0.6)
                continue
            line = ema(mean, smooth) if smooth else mean
            if smooth:  # raw faint, smoothed bold
                ax.plot(steps, mean, color=colour, alpha=0.25, linewidth=1, linestyle=style)
            ax.plot(steps, line, color=colour, linewidth=2 if smooth else 1.5, linestyle=style, label=label)
            if group and any(s is not None for s in std):
                spread = [s or 0.0 for s in std]
                spread = ema(spread, smooth) if smooth else spread
                ax.fill_between(steps, [m - s for m, s in zip(line, spread)], [m + s for m, s in zip(line, spread)],
                                color=colour, alpha=0.2, linewidth=0)
        ax.set_title(panel_title(curve, runs), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "no learning curves in metrics.jsonl", ha="center", va="center")
        axes[0].set_axis_off()
    if smooth or group:
        notes = [f"EMA smoothing {smooth:g} (raw faint)"] * bool(smooth) + ["mean ± std over seeds"] * group
        fig.suptitle("; ".join(notes), fontsize=9)
    fig.tight_layout()
    return fig


def source_curves(runs: Sequence[Run]) -> list[Curve]:
    """A panel per reward source (TRL's ``rewards/<name>/mean``, logged every step) when a run's reward has
    several (one source is the reward panel itself)."""
    names = list(dict.fromkeys(match.group(1) for run in runs for record in run.metrics for key in record
                               if (match := re.fullmatch(r"rewards/([^/]+)/mean", key))))
    if len(names) < 2:
        return []
    return [Curve(f"rewards/{name}/mean", re.compile(rf"^rewards/{re.escape(name)}/mean$")) for name in names]


def panel_title(curve: Curve, runs: Sequence[Run]) -> str:
    """The curve's name and the keys it draws as the runs logged them (``eval/*/`` for every evaluation),
    e.g. ``reward (env/reward_mean)`` for PPO and ``reward`` for GRPO, whose key it is."""
    keys = list(dict.fromkeys(re.sub(r"^eval/(before|during|after)/", "eval/*/", key) for run in runs
                              for record in run.metrics for key in record if curve.pattern.match(key)))
    return curve.title if keys == [curve.title] else f"{curve.title} ({', '.join(keys)})"


def _curve(run: Run, pattern: re.Pattern) -> list[tuple[float, float]]:
    points = []
    for record in run.metrics:
        step = record.get("step")
        for key, value in record.items():
            if pattern.match(key) and _is_number(value) and _is_number(step) and math.isfinite(value):
                points.append((step, value))
    return sorted(points)


def _mean_curve(per_run: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float | None]]:
    """Steps, mean and sample std (None where fewer than two runs logged the step) over runs."""
    at: dict[float, list[float]] = {}
    for points in per_run:
        for step, value in points:
            at.setdefault(step, []).append(value)
    steps = sorted(at)
    return (steps, [statistics.fmean(at[s]) for s in steps],
            [statistics.stdev(at[s]) if len(at[s]) > 1 else None for s in steps])


def _legend(setting: dict[str, Any], seeds: int | None) -> str:
    text = " ".join(f"{key}={_text(value)}" for key, value in setting.items()) or "all runs"
    return text + (f" (n={seeds})" if seeds is not None else "")


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marl-exp compare",
        description="Compare runs from their run dirs: one row per run, the config values that differ, final "
                    "metrics.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, or dirs above them (e.g. a multirun dir)")
    parser.add_argument("--metrics", help="comma-separated summary keys (default: the stage's main metrics present)")
    parser.add_argument("--sort", metavar="METRIC",
                        help="sort rows by this metric, best first (default: the first metric; 'none': path order)")
    parser.add_argument("--group", action="store_true",
                        help="one row (and one curve with a ± std band) per setting: runs that differ only in seed")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    parser.add_argument("--plot", metavar="OUT.png", help="write learning curves to this image")
    parser.add_argument("--smooth", type=float, default=0.0, metavar="W",
                        help="EMA smoothing weight in [0, 1) for the curves, e.g. 0.6 (raw curves stay, faint)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.smooth < 1:
        print(f"marl-exp compare: error: --smooth {args.smooth} must be in [0, 1), e.g. 0.6", file=sys.stderr)
        return 2
    try:
        runs = load_runs(args.paths)
    except FileNotFoundError as err:
        print(f"marl-exp compare: error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"marl-exp compare: error: no runs (dirs with {SUMMARY}, {RESOLVED_CONFIG} or {FAILURE_MARKER}) "
              f"under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    asked = (metrics or []) + ([args.sort] if args.sort not in (None, "none") else [])
    for line in unknown_metrics(runs, asked):
        print(line, file=sys.stderr)
    header, rows = build_table(runs, metrics, sort=args.sort, group=args.group)
    sys.stdout.write(format_table(header, rows, args.format))
    if args.format == "table":
        sys.stdout.write(failure_notes(runs))
    if args.plot:
        sys.stdout.flush()
        path = plot_curves(runs, args.plot, smooth=args.smooth, group=args.group)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
