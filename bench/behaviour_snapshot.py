"""Fingerprint what seeded debug runs produce, to show a refactor changed no behaviour.

    python bench/behaviour_snapshot.py --out before.json          # at the commit before the change
    python bench/behaviour_snapshot.py --out after.json           # after it
    python bench/behaviour_snapshot.py --compare before.json after.json [--rename old=new ...]

Each case runs `train.py` (seed 0, no logger) into its own output dir. The fingerprint holds every logged
value but wall-clock times (metrics.jsonl of every stage of the chain, samples.jsonl) and the sha256 of
every saved tensor file (SFT model, reward adapter, policies, value heads, checkpoints). Stage-cache dirs
are named by their stage only, since a config hash may change with the schema while the run does not.
`--rename` maps metric keys a change renamed on purpose; every other difference is printed, exit 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "ppo-shared": ["debug=ppo"],
    "ppo-separate": ["debug=ppo", "stage.sharing=separate"],
    "ppo-critic-adapter-two-policies": ["debug=ppo", "stage.critic=adapter", "stage.policies=[alice,bob]"],
    "grpo": ["debug=rl", "stage=grpo"],
    "rloo": ["debug=rl", "stage=rloo"],
    "reinforce_pp": ["debug=rl", "stage=reinforce_pp"],
}

# Keys whose values are wall-clock measurements, not behaviour.
TIMING_KEY = re.compile(r"(^|/)(time|timing|perf)/|runtime|_time$|per_s|seconds|elapsed|throughput|^_")


def _stage_relative(path: Path, out_dir: Path) -> str:
    rel = path.relative_to(out_dir).as_posix()
    rel = re.sub(r"cache/(\w+)-[0-9a-f]{6,}", r"cache/\1", rel)  # cache/reward-0cb12b64b9a0 -> cache/reward
    return re.sub(r"runs/[^/]+/[^/]+/", "run/", rel)  # runs/<date>/<time>_<stage>/ -> run/


def _values(row: dict) -> dict:
    return {k: v for k, v in row.items() if not TIMING_KEY.search(k)}


def fingerprint(out_dir: Path) -> dict:
    metrics, tensors = {}, {}
    for path in sorted(out_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = _stage_relative(path, out_dir)
        if path.name in ("metrics.jsonl", "samples.jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            metrics[rel] = [_values(r) for r in rows]
        elif path.suffix in (".safetensors", ".bin"):
            tensors[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"metrics": metrics, "tensors": tensors}


def run_case(name: str, overrides: list[str], work: Path) -> dict:
    out_dir = work / name
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "seed=0", "logger=none", f"output_dir={out_dir}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name}: train.py exited {done.returncode}\n{done.stderr[-2000:]}")
    print(f"{name}: ok", flush=True)
    return fingerprint(out_dir)


def _commit() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head + ("+dirty" if dirty else "")


def snapshot(out: Path, cases: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="snapshot-") as tmp:
        result = {"commit": _commit(), "cases": {n: run_case(n, CASES[n], Path(tmp)) for n in cases}}
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"wrote {out} ({result['commit']})")


def _renamed(rows: list[dict], renames: dict[str, str]) -> list[dict]:
    return [{renames.get(k, k): v for k, v in row.items()} for row in rows]


def parse_renames(specs: list[str]) -> dict[str | None, dict[str, str]]:
    """``OLD=NEW`` renames a key in every case; ``CASE,CASE:OLD=NEW`` in those cases only."""
    renames: dict[str | None, dict[str, str]] = {}
    for spec in specs:
        cases, _, pair = spec.rpartition(":") if ":" in spec.split("=", 1)[0] else ("", "", spec)
        old, new = pair.split("=", 1)
        for case in cases.split(",") if cases else [None]:
            renames.setdefault(case, {})[old] = new
    return renames


def compare(before: dict, after: dict, renames: dict[str | None, dict[str, str]]) -> list[str]:
    problems = []
    for case in sorted(set(before["cases"]) | set(after["cases"])):
        b, a = before["cases"].get(case), after["cases"].get(case)
        if b is None or a is None:
            problems.append(f"{case}: only in {'after' if b is None else 'before'}")
            continue
        for kind in ("tensors", "metrics"):
            for file in sorted(set(b[kind]) | set(a[kind])):
                old, new = b[kind].get(file), a[kind].get(file)
                if kind == "metrics" and old is not None:
                    old = _renamed(old, {**renames.get(None, {}), **renames.get(case, {})})
                if old != new:
                    problems.append(f"{case}: {file} differs" + _first_difference(old, new))
    return problems


def _first_difference(old, new) -> str:
    if not isinstance(old, list) or not isinstance(new, list):
        return f" ({'missing before' if old is None else 'missing after' if new is None else 'hash'})"
    if len(old) != len(new):
        return f" ({len(old)} rows before, {len(new)} after)"
    for i, (o, n) in enumerate(zip(old, new)):
        keys = sorted(set(o) | set(n))
        diff = [k for k in keys if o.get(k, "<absent>") != n.get(k, "<absent>")]
        if diff:
            k = diff[0]
            return f" (row {i}, {len(diff)} keys, e.g. {k}: {o.get(k, '<absent>')!r} -> {n.get(k, '<absent>')!r})"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write a snapshot of the cases to this file")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="metric keys renamed on purpose; CASE,CASE:OLD=NEW for some cases only")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        renames = parse_renames(args.rename)
        problems = compare(before, after, renames)
        print(f"{before['commit']} -> {after['commit']}: {len(before['cases'])} cases")
        for line in problems:
            print("  " + line)
        print("identical" if not problems else f"{len(problems)} differences")
        sys.exit(1 if problems else 0)
    if not args.out:
        parser.error("give --out FILE to snapshot, or --compare BEFORE AFTER")
    snapshot(args.out, args.cases)


if __name__ == "__main__":
    main()
