"""bench/convergence.py --from-json: merging results files keeps each file's machine record, a collected
file's (``collected_by``) included, and the rows of all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_merge_keeps_each_files_machine_and_every_row(tmp_path):
    published = json.loads((REPO / "bench" / "results" / "convergence.json").read_text())
    rows = published["rows"]
    ran = {"machine": {"cpu": "ran here", "git": "abc1234"}, "seeds": {"list": [4101]}, "rows": rows[:1]}
    collected = {"collected_by": {"cpu": "collected here", "git": "def5678"}, "seeds": {"list": [4102, 4103]},
                 "overrides": ["threads=1"], "rows": rows[1:]}
    paths = []
    for name, payload in (("ran", ran), ("collected", collected)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    done = subprocess.run([sys.executable, "bench/convergence.py", "--from-json", *map(str, paths),
                           "--results", str(tmp_path / "out"), "--name", "merged", "--png", str(tmp_path / "c.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    merged = json.loads((tmp_path / "out" / "merged.json").read_text())
    assert [m["machine"]["cpu"] for m in merged["merged_from"]] == ["ran here", "collected here"]
    assert merged["merged_from"][1]["overrides"] == ["threads=1"]
    assert merged["rows"] == rows and merged["targets"]["oracle_strict_min"] == 0.8
    assert (tmp_path / "c.png").stat().st_size > 0
