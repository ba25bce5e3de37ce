"""``marl-exp check-model <dir> [--quant 8bit] [--checks a,b] [--sharing shared]``: the PPO invariants on your model.

Runs before a single GPU hour is spent: loads the model the way a run does, adds a probe reward
adapter, and checks each invariant of ``marl_exp.conformance.checks`` against an independent
reference, those that read the reference or reward role in each sharing mode. Prints a table, one line per
failed check and the time taken, nothing from the libraries; exit code 0 when every check passes, 1 when one
fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from marl_exp.conformance import CHECKS, SHARING_MODES

QUANT_MODES = ("fp32", "bf16", "8bit", "4bit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="marl-exp check-model", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a local causal-LM directory (config.json, weights, tokenizer)")
    parser.add_argument("--quant", default="fp32", choices=QUANT_MODES, help="load the base like quant=<mode>")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--sharing", default=",".join(SHARING_MODES),
                        help=f"comma-separated stage.sharing modes for the role checks: {', '.join(SHARING_MODES)}")
    args = parser.parse_args(argv)
    checks = _names(parser, args.checks, CHECKS, "check")
    sharing = _names(parser, args.sharing, SHARING_MODES, "sharing mode")
    if not (Path(args.model_dir) / "config.json").is_file():
        parser.exit(2, f"marl-exp check-model: error: {args.model_dir!r} is not a model directory (no config.json); "
                       "give the directory save_pretrained wrote\n")
    start = time.monotonic()
    with quiet_libraries():
        from marl_exp.conformance.checks import check_model, format_table  # heavy imports after the argument checks

        results = check_model(args.model_dir, quant=args.quant, checks=checks, sharing=sharing)
    print(format_table(results, f"marl-exp check-model {args.model_dir} ({args.quant})"))
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"FAIL {r.name}{f' ({r.sharing})' if r.sharing else ''}: {r.detail}")
    print(f"{len(results)} checks, {len(failed)} failed, in {time.monotonic() - start:.0f} s", flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def quiet_libraries():
    """While the checks run: no progress bars, load reports (the probe classifier's new score head is
    expected), deprecation warnings or bitsandbytes kernel notices. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    saved_env = {key: os.environ.get(key) for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    saved_levels = {name: logging.getLogger(name).level for name in ("bitsandbytes", "peft")}
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in saved_levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _names(parser, given: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    """The comma-separated names in ``given``; exit 2 with one line on an unknown or missing one."""
    names = tuple(n for n in given.split(",") if n)
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        parser.exit(2, f"marl-exp check-model: error: unknown {what}(s) {', '.join(unknown) or '(none given)'}; "
                       f"choose from {', '.join(known)}\n")
    return names


if __name__ == "__main__":
    sys.exit(main())
