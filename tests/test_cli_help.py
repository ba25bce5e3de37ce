"""The ``marl-exp`` command explains itself: bare or ``--help`` lists the subcommands and starts nothing;
training runs only as ``marl-exp train`` (the same Hydra app as ``python train.py``), whose ``--help`` is
Hydra's, listing the config groups without the internal ``*_schema`` entries."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import CONF_DIR, REPO

# Written out here, not read from marl_exp: the help must list exactly these.
COMMANDS = ("train", "compare", "sample", "check-model", "import-gguf")
ERROR = "marl-exp: error:"


def marl_exp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "marl_exp", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def train_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR)]


def conf_groups() -> dict[str, list[str]]:
    """group -> its YAML options, from the files under conf/ (Hydra's own groups under conf/hydra left out)."""
    groups = {}
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        options = sorted(f.stem for f in group.glob("*.yaml"))
        if options:
            groups[group.name] = options
    return groups


def command_lines(usage: str) -> dict[str, str]:
    """``  <command>  <what it does>`` lines of the usage text: command -> description."""
    found = (re.match(r"^  (\S+)\s{2,}(\S.*)$", line) for line in usage.splitlines())
    return {m.group(1): m.group(2) for m in found if m and m.group(1) in COMMANDS}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_subcommand_and_how_to_get_its_help(flag):
    proc = marl_exp(flag, timeout=30)
    assert proc.returncode == 0, proc.stderr
    described = command_lines(proc.stdout)
    assert sorted(described) == sorted(COMMANDS), proc.stdout
    assert all(len(text) > 10 for text in described.values()), described
    assert "marl-exp train --help" in proc.stdout and "marl-exp <command> --help" in proc.stdout
    assert "python train.py" in proc.stdout  # training's other entry point


def test_bare_command_prints_the_usage_and_trains_nothing():
    proc = marl_exp(timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert sorted(command_lines(proc.stderr)) == sorted(COMMANDS), proc.stderr
    assert "marl-exp: stage=" not in proc.stdout + proc.stderr  # the plan line a training run prints first
    assert error_lines(proc.stderr) == [
        f"{ERROR} no command given; training starts with `marl-exp train [overrides]` or `python train.py [overrides]`"]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_each_tool_has_its_own_argparse_help(command):
    proc = marl_exp(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: marl-exp {command} "), proc.stdout


def test_train_help_is_hydras_with_every_config_group_and_no_schema():
    proc = marl_exp("train", "--help")
    assert proc.returncode == 0, proc.stderr
    listed = dict(re.findall(r"^([a-z_]+): ([\w, -]+)$", proc.stdout, flags=re.MULTILINE))
    assert {group: sorted(options.split(", ")) for group, options in listed.items() if group in conf_groups()} \
        == conf_groups(), proc.stdout
    assert "schema" not in proc.stdout.split("== Config ==")[0], proc.stdout
    assert "Override anything in the config (foo.bar=value)" in proc.stdout  # Hydra's full config follows
    assert train_py("--help").stdout == proc.stdout  # one app, one help


def test_help_paths_do_not_import_torch():
    """The command list and Hydra's help must come up in about a second: torch takes several."""
    probe = ("import sys\n"
             "from marl_exp.__main__ import main\n"
             "sys.argv = ['marl-exp', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    for args in (["--help"], [], ["train", "--help"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.stderr.splitlines()[-1] == "torch imported: False", (args, proc.stderr)


@pytest.mark.parametrize("word, line", [
    ("smaple", f"{ERROR} unknown command 'smaple'; did you mean `marl-exp sample`? "
               f"(commands: {', '.join(COMMANDS)}; see marl-exp --help)"),
    ("nonsense", f"{ERROR} unknown command 'nonsense' (commands: {', '.join(COMMANDS)}; see marl-exp --help)"),
    ("stage=sft", f"{ERROR} 'stage=sft' is not a command; Hydra overrides go after `train`: "
                  "marl-exp train stage=sft"),
    ("-m", f"{ERROR} '-m' is not a command; Hydra overrides go after `train`: marl-exp train -m"),
])
def test_unknown_command_is_one_line_with_a_suggestion(word, line):
    proc = marl_exp(word, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]
    assert "marl-exp: stage=" not in proc.stdout


def test_train_is_train_py_same_one_line_error():
    ours, reference = marl_exp("train", "model=gtp2"), train_py("model=gtp2")
    assert (ours.returncode, ours.stderr) == (reference.returncode, reference.stderr) == (2, reference.stderr)
    assert error_lines(ours.stderr) == [ours.stderr.strip()], ours.stderr
    assert "did you mean model=gpt2?" in ours.stderr


def test_train_multirun_runs_every_job_like_train_py(tmp_path):
    """``-m`` reaches Hydra: two jobs, each a one-line config error, then the sweep report (exit 1)."""
    args = ("-m", "adapter.r=0,-1", "logger=none")
    ours = marl_exp("train", *args, f"output_dir={tmp_path / 'ours'}")
    reference = train_py(*args, f"output_dir={tmp_path / 'reference'}")
    assert ours.returncode == reference.returncode == 1, ours.stderr
    assert error_lines(ours.stderr) == error_lines(reference.stderr) == [
        f"{ERROR} adapter.r=0 must be > 0; a LoRA rank such as 8 or 16",
        f"{ERROR} adapter.r=-1 must be > 0; a LoRA rank such as 8 or 16"]
    assert len(list((tmp_path / "ours").glob("multirun/*/*/[01]/FAILED"))) == 2
