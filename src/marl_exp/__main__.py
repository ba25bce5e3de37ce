"""``marl-exp``: training and the tools around it, one subcommand each.

``marl-exp train [overrides]`` is ``python train.py [overrides]``: the same Hydra app (``marl_exp.cli``).
The tools are ``main(argv) -> exit code`` functions with their own argparse help. Bare ``marl-exp`` and
``--help`` list the commands and start nothing. Import-light: nothing heavy loads before a command is chosen.
"""

import difflib
import importlib
import shlex
import sys
from typing import NoReturn

PROG = "marl-exp"
USAGE_ERROR = 2
TRAIN = "train"
TRAIN_SUMMARY = "train a stage: sft, reward, ppo, grpo, rloo or reinforce_pp (= python train.py [overrides])"
# command -> (module whose ``main(argv)`` runs it, what it does)
TOOLS = {
    "compare": ("marl_exp.compare", "tables and learning curves of finished runs, from their run dirs"),
    "sample": ("marl_exp.sample", "a trained policy's samples beside the reference's, with reward and KL"),
    "check-model": ("marl_exp.conformance.cli", "the PPO invariants on your own model, before a GPU hour is spent"),
    "import-gguf": ("marl_exp.modeling.gguf_import", "a GGUF checkpoint as a plain Hugging Face model dir"),
}
COMMANDS = (TRAIN, *TOOLS)


def usage() -> str:
    summaries = {TRAIN: TRAIN_SUMMARY, **{name: summary for name, (_, summary) in TOOLS.items()}}
    width = max(map(len, COMMANDS)) + 2
    return "\n".join([
        f"usage: {PROG} <command> [arguments]",
        "",
        "Multi-adapter RLHF on one base model. Commands:",
        *(f"  {name:<{width}}{summary}" for name, summary in summaries.items()),
        "",
        f"Help: {PROG} train --help (Hydra's: config groups and every key); {PROG} <command> --help.",
        f"First run: {PROG} train debug=ppo (the whole chain on a tiny model in about a minute; "
        "= python train.py debug=ppo).",
    ])


def main() -> None:
    args = sys.argv[1:]
    if not args:  # training is never a default: it takes minutes to hours
        print(usage(), file=sys.stderr)
        usage_error(f"no command given; training starts with `{PROG} train [overrides]` or "
                    "`python train.py [overrides]`")
    command, rest = args[0], args[1:]
    if command in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if command == TRAIN:
        train(rest)
        return
    if command in TOOLS:
        tool = importlib.import_module(TOOLS[command][0])
        sys.exit(tool.main(rest))
    usage_error(unknown_command(args))


def train(overrides: list[str]) -> None:
    """``python train.py <overrides>``: Hydra reads ``sys.argv``, so it gets exactly those."""
    from marl_exp.cli import run_app
    from marl_exp.config import project_root

    conf = project_root() / "conf"
    if not conf.is_dir():
        sys.exit(f"{PROG}: error: config dir {conf} not found; install with `pip install -e .` from a clone")
    sys.argv = [f"{PROG} {TRAIN}", *overrides]  # argv[0] names the program in Hydra's own usage errors
    run_app(conf)


def unknown_command(args: list[str]) -> str:
    word = args[0]
    if word.startswith("-") or "=" in word:  # Hydra overrides without the command
        return f"{word!r} is not a command; Hydra overrides go after `{TRAIN}`: {PROG} {TRAIN} {shlex.join(args)}"
    close = difflib.get_close_matches(word, COMMANDS, n=1)
    hint = f"; did you mean `{PROG} {close[0]}`?" if close else ""
    return f"unknown command {word!r}{hint} (commands: {', '.join(COMMANDS)}; see {PROG} --help)"


def usage_error(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


if __name__ == "__main__":
    main()
