"""bench/convergence.py --from-json: merging results files keeps each file's machine record, a collected
file's (``collected_by``) included, and the rows of all."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench_common_and_repo(path: Path):
    """bench/common.py, and a ``git`` function on a new repository at ``path``."""
    sys.path.insert(0, str(REPO / "bench"))
    import common  # noqa: PLC0415  (bench/ is not a package)

    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    git("config", "user.email", "t@t"), git("config", "user.name", "t")
    return common, git


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


def test_a_tree_is_dirty_only_where_the_measured_code_changed(tmp_path, monkeypatch):
    """A results file or a docs page the benchmark itself wrote leaves the tree clean; a source change does not."""
    common, git = bench_common_and_repo(tmp_path)
    files = {name: tmp_path / name for name in ("bench/results/perf-memory.json", "docs/performance.md",
                                                 "src/marl_exp/model.py", "conf/stage/ppo.yaml")}
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("0")
    git("add", "."), git("commit", "-qm", "tree")
    monkeypatch.setattr(common, "REPO", tmp_path)
    assert common.git_state()[1] == ""
    files["bench/results/perf-memory.json"].write_text("1")
    files["docs/performance.md"].write_text("1")
    assert common.git_state()[1] == "" and common.machine()["tree"] == "clean"
    for code in ("src/marl_exp/model.py", "conf/stage/ppo.yaml"):
        files[code].write_text("1")
        assert code in common.git_state()[1]
        files[code].write_text("0")
    files["conf/stage/ppo.yaml"].write_text("1")
    assert common.machine()["tree"] == "dirty" and common.machine()["git"].endswith("+dirty")


def test_a_results_file_where_numbers_are_published_needs_a_clean_tree(tmp_path, monkeypatch):
    """memory, speed, trl_peer, overoptimization, flops and run_all refuse to publish uncommitted code; a smoke
    run writing elsewhere (a test's tmp dir) may measure it."""
    common, git = bench_common_and_repo(tmp_path)
    code = tmp_path / "src" / "model.py"
    code.parent.mkdir()
    code.write_text("0")
    git("add", "."), git("commit", "-qm", "tree")
    monkeypatch.setattr(common, "REPO", tmp_path)
    published = tmp_path / "bench" / "results" / "perf-speed.json"
    common.refuse_dirty_publish(published, allow_dirty=False)  # clean: fine
    code.write_text("1")
    with pytest.raises(SystemExit, match="uncommitted changes .*src/model.py.*--allow-dirty"):
        common.refuse_dirty_publish(published, allow_dirty=False)
    with pytest.raises(SystemExit):
        common.refuse_dirty_publish(tmp_path / "docs" / "real_model.png", allow_dirty=False)
    common.refuse_dirty_publish(published, allow_dirty=True)
    common.refuse_dirty_publish(tmp_path / "outputs" / "smoke.json", allow_dirty=False)
    common.refuse_dirty_publish(None, allow_dirty=False)


@pytest.mark.parametrize("script", ["memory.py", "speed.py", "trl_peer.py", "overoptimization.py", "flops.py",
                                    "run_all.py", "shared_prefill.py", "grpo_step_ablation.py", "trl_ppo_peer.py", "update_profile.py",
                                    "wait_policy.py", "threads.py"])
def test_every_results_writing_benchmark_takes_allow_dirty(script):
    done = subprocess.run([sys.executable, f"bench/{script}", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--allow-dirty" in done.stdout


def test_a_seed_list_is_dated_by_the_commit_that_gave_it_its_seeds(tmp_path, monkeypatch):
    """Adding another list to bench/seeds.json later must not move the commit a claim names."""
    common, git = bench_common_and_repo(tmp_path)
    seeds = tmp_path / "bench" / "seeds.json"
    seeds.parent.mkdir()
    commits = []
    for lists in ({"a": [1, 2]}, {"a": [3, 4]}, {"a": [3, 4], "b": [5]}):
        seeds.write_text(json.dumps(lists))
        git("add", "."), git("commit", "-qm", "seeds")
        commits.append(git("log", "-1", "--format=%h").strip())
    monkeypatch.setattr(common, "REPO", tmp_path)
    assert common.seeds("a") == ([3, 4], commits[1]) and common.seeds("b") == ([5], commits[2])
    seeds.write_text(json.dumps({"a": [3, 4], "b": [6]}))  # changed, not committed
    assert common.seeds("b") == ([6], "uncommitted") and common.seeds("a") == ([3, 4], commits[1])
