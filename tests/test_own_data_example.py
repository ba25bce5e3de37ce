"""The README's "Bring your own data and reward" example, run as written (from the README's own text) with a
shorter schedule: each stage reads its own file, and the user's reward function is a source beside the reward
adapter in the plan, the evaluations and the summary."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

SHORTER = ["logger=none", "upstream.sft.max_steps=20", "upstream.reward.max_steps=20", "stage.steps=2",
           "stage.eval.eval_samples=8"]


def readme_command() -> list[str]:
    """The bash block of the README section, with its line continuations joined."""
    section = (REPO / "README.md").read_text().split("## Bring your own data and reward", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_example_files_are_what_their_script_writes(tmp_path):
    example = REPO / "examples" / "own_data"
    committed = {name: (example / name).read_text() for name in ("texts.jsonl", "pairs.jsonl", "prompts.jsonl")}
    subprocess.run([sys.executable, str(example / "make_files.py"), str(tmp_path)], check=True)
    assert {name: (tmp_path / name).read_text() for name in committed} == committed


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    command = readme_command()
    assert command[:2] == ["python", "train.py"]
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, *command[1:], *SHORTER, f"output_dir={tmp_path}",
                             f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 × reward + 0.5 × great" in result.stdout, result.stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for when in ("before", "after"):
        assert f"eval/{when}/rewards/great/mean" in summary and f"eval/{when}/rewards/reward/mean" in summary
    # With no data.train_file, the SFT and reward stages the cache built could only read their own files.
    assert len(list((tmp_path / "cache").glob("sft-*/model"))) == 1
    assert len(list((tmp_path / "cache").glob("reward-*/reward_adapter"))) == 1
    config = (run_dir / "resolved_config.yaml").read_text()
    assert "prompts_file: examples/own_data/prompts.jsonl" in config
