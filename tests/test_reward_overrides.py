"""Reward sources written on the command line as a user writes them (issue 23, item 4): each form composes to
the config of the ``++stage.rewards={...}`` form (the one Hydra took before), validates, and runs through
``train.py``; the module of a reward function is imported from the working directory; a reward function that
fails mid-run ends the run with one line, exit 2.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose
from marl_exp import cli
from marl_exp.config import (
    ConfigError,
    RewardSource,
    check_reward_overrides,
    declare_reward_sources,
    load_reward_function,
    reward_sources,
    validate,
)

FUNCTION = "reward_functions:word_count"  # tests/reward_functions.py (on sys.path under pytest)


def rewards_of(*overrides: str) -> dict:
    """``stage.rewards`` of the config ``train.py <overrides>`` runs with, after validation."""
    cfg = compose("stage=grpo", *declare_reward_sources(list(overrides)))
    validate(cfg)
    return OmegaConf.to_container(cfg.stage.rewards)


@pytest.mark.parametrize("overrides", [
    [f"stage.rewards.great.function={FUNCTION}", "stage.rewards.great.weight=0.5"],
    [f"stage.rewards={{great:{{function:'{FUNCTION}',weight:0.5}}}}"],
    [f"+stage.rewards.great.function={FUNCTION}", "++stage.rewards.great.weight=0.5"],
    [f"stage.rewards={{great:{{function:'{FUNCTION}'}}}}", "stage.rewards.great.weight=0.5"],
])
def test_every_override_form_composes_to_the_force_add_form(overrides):
    reference = rewards_of(f"++stage.rewards={{great:{{function:'{FUNCTION}',weight:0.5}}}}")
    assert rewards_of(*overrides) == reference
    cfg = compose("stage=grpo", *declare_reward_sources(overrides))
    assert reward_sources(cfg.stage) == [RewardSource("great", 0.5, function=FUNCTION)]


def test_a_preset_source_keeps_its_settings_when_one_key_is_overridden():
    preset = rewards_of("+rewards=monitor_gold")
    changed = rewards_of("+rewards=monitor_gold", "stage.rewards.oracle_strict.weight=0.25")
    assert changed == {**preset, "oracle_strict": {**preset["oracle_strict"], "weight": 0.25}}
    assert changed["oracle_strict"]["function"] == "marl_exp.rewards:oracle_strict"
    added = rewards_of("+rewards=monitor_gold", f"stage.rewards={{great:{{function:'{FUNCTION}'}}}}")
    assert list(added) == ["reward", "oracle_strict", "great"] and added["reward"] == preset["reward"]


def test_only_sources_are_declared_once_each_before_their_first_override():
    assert declare_reward_sources(["stage.steps=3", "stage.rewards.a.weight=1", "stage.rewards.a.function=m:f",
                                   "stage.rewards={a:{},b:{}}", "~stage.rewards.c", "stage.rewards.x y.weight=1"]) == \
        ["stage.steps=3", "++stage.rewards={a:{}}", "stage.rewards.a.weight=1", "stage.rewards.a.function=m:f",
         "++stage.rewards={b:{}}", "stage.rewards={a:{},b:{}}", "~stage.rewards.c", "stage.rewards.x y.weight=1"]


def run_train(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_train_py_takes_the_forms_as_written(tmp_path):
    proc = run_train("stage=grpo", "logger=none", f"stage.rewards.great.function={FUNCTION}",
                     "stage.rewards.great.weight=0.5", "--cfg", "job", cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = OmegaConf.create(proc.stdout)
    assert OmegaConf.to_container(job.stage.rewards) == {
        "great": {"adapter": None, "function": FUNCTION, "weight": 0.5, "label_index": None}}
    proc = run_train("stage=grpo", "stage.rewards.great.functon=m:f", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "marl-exp: error: stage.rewards.great.functon=m:f is not a config key; did you mean "
        "stage.rewards.great.function?"]


MY_REWARD = textwrap.dedent("""
    def great(prompts, completions):
        return [float("great" in c) for c in completions]
""")


def test_a_reward_module_in_the_working_directory_is_imported(tmp_path):
    """Through the real entry point (preflight validates the sources before Hydra makes the run dir): the
    function imports from the working directory, not on PYTHONPATH, and the run goes on to the next check."""
    (tmp_path / "my_reward.py").write_text(MY_REWARD)
    proc = run_train("stage=grpo", "logger=none", f"output_dir={tmp_path / 'out'}",
                     "stage.rewards.great.function=my_reward:great", "stage.reward_adapter=/tmp", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "marl-exp: error: stage.reward_adapter='/tmp' is not used: no source in stage.rewards reads the upstream "
        "reward adapter; drop it, or add a source without adapter and function"]
    script = tmp_path / "elsewhere" / "load.py"  # sys.path[0] is the script's dir, not the working dir
    script.parent.mkdir()
    script.write_text("from marl_exp.config import load_reward_function\n"
                      "print(load_reward_function('k', 'my_reward:great')([], ['a great film', 'dull']))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[1.0, 0.0]"


def test_an_installed_module_is_not_shadowed_by_the_working_directory(tmp_path):
    (tmp_path / "colorsys.py").write_text(MY_REWARD)  # a standard-library name
    script = tmp_path / "elsewhere" / "load.py"
    script.parent.mkdir()
    script.write_text("import sys\nfrom marl_exp.config import load_reward_function\nassert 'colorsys' not in sys.modules\n"
                      "load_reward_function('k', 'colorsys:great')\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "ConfigError: k='colorsys:great': 'colorsys' has no 'great'" in proc.stderr, proc.stderr[-2000:]


def test_a_failing_reward_function_ends_the_run_in_one_line(tmp_path, monkeypatch, capsys):
    """A reward function that fails at the first evaluation is the user's input: one line naming the source
    and what it returned, ``FAILED`` in the run dir, exit 2 (not a traceback, exit 1)."""
    from marl_exp.rl.reward_sources import RewardSources
    from marl_exp.stages import pipeline

    cfg = compose("stage=grpo", "logger=none", f"output_dir={tmp_path}", "threads=1",
                  "++stage.rewards={bad:{function:'reward_functions:too_few'}}")
    sources = RewardSources(reward_sources(cfg.stage))

    def first_evaluation(cfg, run_dir):
        sources.call("bad", ["a", "b", "c"], ["x", "y", "z"])

    monkeypatch.setattr(pipeline, "run_stage", first_evaluation)
    with pytest.raises(SystemExit) as exit_:
        cli.main(cfg, tmp_path / "run")
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == ("marl-exp: error: reward source 'bad' (reward_functions:too_few) returned 2 values for 3 "
                         "completions; it must return one float per completion")
    assert (tmp_path / "run" / cli.FAILURE_MARKER).is_file()


def test_a_source_named_twice_is_still_refused_in_the_plain_form():
    overrides = declare_reward_sources(["stage.rewards={a:{weight:1},a:{weight:2}}"])
    with pytest.raises(ConfigError, match=r"stage\.rewards=\{a:\{weight:1\},a:\{weight:2\}\} names the source 'a' "
                                          r"twice"):
        check_reward_overrides(overrides)
