"""``marl-exp compare PATH...``: compare finished runs offline, from their run dirs (no W&B needed).

A PATH is a run dir (it holds ``summary.json`` or a ``FAILED`` marker) or any dir above run dirs, e.g. a
multirun dir, which expands to its job dirs. Each run's ``summary.json``, ``metrics.jsonl`` and
``.hydra/overrides.yaml`` are read; the table has one row per run, the overrides that differ between the
runs as columns, and the chosen final metrics. ``--plot out.png`` draws learning curves coloured by the
differing overrides.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

FAILURE_MARKER = "FAILED"
SUMMARY = "summary.json"
# Final metrics shown by default (those that exist in at least one run), in this order.
DEFAULT_METRICS = ("eval/after/oracle_score", "eval/after/reward_score", "eval/after/kl", "eval/pairwise_accuracy",
                   "eval/loss", "time/total_s")
# Learning-curve panels: (title, how to pick the metric keys of metrics.jsonl).
CURVES = (
    # PPO logs env/reward_mean, the critic-free stages TRL's name: reward.
    ("reward (env/reward_mean)", re.compile(r"^(env/reward_mean|reward)$")),
    ("oracle score (eval/*/oracle_score)", re.compile(r"^eval/(before|during|after)/oracle_score$")),
    ("KL (objective/kl)", re.compile(r"^objective/kl$")),
    ("train/loss", re.compile(r"^train/loss$")),
    ("eval/loss", re.compile(r"^eval/loss$")),
)
# Directories inside a run that never hold other runs.
_SKIP_DIRS = {".hydra", "wandb", "checkpoints", "policies", "model", "reward_adapter", "cache", ".submitit"}


@dataclass
class Run:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, str] = field(default_factory=dict)
    failed: bool = False
    error: str = ""
    label: str = ""

    @property
    def status(self) -> str:
        if self.failed:
            return "FAILED"
        return "ok" if self.summary else "incomplete"


# ------------------------------------------------------------------------------------------ discovery
def is_run_dir(path: Path) -> bool:
    return (path / SUMMARY).is_file() or (path / FAILURE_MARKER).is_file()


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
    summary_path = run.path / SUMMARY
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):
            run.summary = {}
    metrics_path = run.path / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(record, dict):
                run.metrics.append(record)
    run.overrides = read_overrides(run.path)
    marker = run.path / FAILURE_MARKER
    if marker.is_file():
        run.failed = True
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


def differing_overrides(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (all keys when there is one run)."""
    keys: list[str] = []
    for run in runs:
        keys.extend(key for key in run.overrides if key not in keys)
    if len(runs) <= 1:
        return keys
    return [key for key in keys if len({run.overrides.get(key) for run in runs}) > 1]


def default_metrics(runs: Sequence[Run]) -> list[str]:
    present = set().union(*(run.summary for run in runs)) if runs else set()
    return [key for key in DEFAULT_METRICS if key in present]


# ---------------------------------------------------------------------------------------------- tables
def build_table(runs: Sequence[Run], metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (raw values; None = missing)."""
    metrics = list(metrics) if metrics else default_metrics(runs)
    columns = differing_overrides(runs)
    header = ["run", "status", *columns, *metrics]
    rows = []
    for run in runs:
        row: list[Any] = [run.label, run.status]
        row += [run.overrides.get(key) for key in columns]
        row += [run.summary.get(metric) for metric in metrics]
        rows.append(row)
    return header, rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_table(header: list[str], rows: list[list[Any]], fmt: str = "table") -> str:
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if value is None else value for value in row] for row in rows])
        return buffer.getvalue()
    cells = [[_cell(value) for value in row] for row in rows]
    if fmt == "markdown":
        def line(values):
            return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"
        numeric = [all(_is_number(row[i]) for row in rows if row[i] is not None) and i >= 2
                   for i in range(len(header))]
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
def plot_curves(runs: Sequence[Run], out: str | Path) -> Path:
    """One panel per learning curve that some run logged; one line per run, coloured by its overrides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = differing_overrides(runs)
    panels = []
    for title, pattern in CURVES:
        series = [(run, _curve(run, pattern)) for run in runs]
        if any(points for _, points in series):
            panels.append((title, series))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (title, series) in zip(axes[0], panels):
        for index, (run, points) in enumerate(series):
            if not points:
                continue
            steps, values = zip(*points)
            label = _legend(run, columns) + (" (FAILED)" if run.failed else "")
            ax.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3,
                    color=colours(index % 10), linestyle="--" if run.failed else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no learning curves in metrics.jsonl", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _curve(run: Run, pattern: re.Pattern) -> list[tuple[float, float]]:
    points = []
    for record in run.metrics:
        step = record.get("step")
        for key, value in record.items():
            if pattern.match(key) and _is_number(value) and _is_number(step) and math.isfinite(value):
                points.append((step, value))
    return sorted(points)


def _legend(run: Run, columns: Sequence[str]) -> str:
    parts = [f"{key}={run.overrides.get(key, '-')}" for key in columns]
    return " ".join(parts) if parts else run.label


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="marl-exp compare",
        description="Compare runs from their run dirs: one row per run, the overrides that differ, final metrics.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run dirs, or dirs above them (e.g. a multirun dir)")
    parser.add_argument("--metrics", help="comma-separated summary keys (default: the stage's main metrics present)")
    parser.add_argument("--format", choices=("table", "markdown", "csv"), default="table")
    parser.add_argument("--plot", metavar="OUT.png", help="write learning curves to this image")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.paths)
    except FileNotFoundError as err:
        print(f"marl-exp compare: error: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"marl-exp compare: error: no runs (dirs with {SUMMARY} or {FAILURE_MARKER}) under "
              f"{' '.join(args.paths)}", file=sys.stderr)
        return 2
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    header, rows = build_table(runs, metrics)
    sys.stdout.write(format_table(header, rows, args.format))
    if args.format == "table":
        sys.stdout.write(failure_notes(runs))
    if args.plot:
        sys.stdout.flush()
        path = plot_curves(runs, args.plot)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
