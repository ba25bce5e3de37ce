"""Hydra's own command-line errors as one line that names the fix, exit code 2.

Hydra reports a bad override before marl-exp's code runs, in several lines and with hints that mislead
here: "To append to your config use +learning_rate=1e-4" (which then runs, ignoring the value, at the
default: the key belongs under ``stage.``), or a list of options that includes the ``schema`` entries.
``describe`` turns such an error into one line naming the closest valid key or option; ``install``
routes Hydra's error reporting through it. Errors it does not recognise (bugs) keep Hydra's report, and
``HYDRA_FULL_ERROR=1`` keeps full tracebacks for everything.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from marl_exp.config import ConfigError, STAGE_SCHEMAS, unknown_key_message, valid_keys

PREFIX = "marl-exp: error:"
EXIT_CODE = 2


def describe(err: BaseException, overrides: list[str]) -> str | None:
    """One line for a command-line mistake Hydra reported as ``err``; None when it is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(err, ConfigError):  # raised by our Preflight callback
        return _one_line(str(err))
    if isinstance(err, MissingConfigException):
        return _missing_option(str(err), overrides)
    if isinstance(err, OverrideParseException):
        return _unparsable(overrides, str(err))
    if isinstance(err, ConfigCompositionException):
        return _composition(err, overrides)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def _value_of(key: str, overrides: list[str]) -> str | None:
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return None


def _stage_of(overrides: list[str]) -> str:
    """The stage a command line selects (stage=..., or a debug preset of that name); ppo by default."""
    for override in overrides:
        name, _, value = override.lstrip("+~").partition("=")
        if name in ("stage", "debug") and value in STAGE_SCHEMAS:
            return value
    return "ppo"


def _missing_option(text: str, overrides: list[str]) -> str:
    """``model=gtp2``: Hydra lists the group's options, including the schema entries; name the real ones."""
    found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if not found:
        return _one_line(_first_line(text))
    group, option = found.groups()
    listed = re.search(rf"Available options in '{re.escape(group)}':\n((?:\t.*\n?)*)", text)
    options = [o.strip() for o in listed.group(1).splitlines()] if listed else []
    options = [o for o in options if o and o != "schema" and not o.endswith("_schema")]
    close = difflib.get_close_matches(option, options, 1, 0.5)
    hint = f"did you mean {group}={close[0]}? " if close else ""
    choices = f"options: {', '.join(options)}" if options else f"no options found in conf/{group}/"
    return f"{group}={option} is not a {group} option; {hint}({choices})"


def _unparsable(overrides: list[str], text: str) -> str:
    """Hydra's parse error does not say which override; find it by parsing them one by one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception as err:  # noqa: BLE001 - this one does not parse
            reason = _first_line(str(err))
            return (f"cannot parse the override {override!r} ({reason}); the form is key=value, with quotes around "
                    "values holding spaces or special characters, e.g. 'key=\"a b\"' or key=[a,b] for a list")
    return f"cannot parse the command line ({_first_line(text)}); the form is key=value"


def _composition(err: BaseException, overrides: list[str]) -> str | None:
    text, cause = str(err), err.__cause__
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown:  # a key that is not where it was given: name the valid keys closest to it
        key = unknown.group(1)
        if key.startswith("hydra."):
            return f"{key} is not a Hydra setting; `python train.py --hydra-help` lists them"
        return unknown_key_message(key, _value_of(key, overrides), valid_keys(_stage_of(overrides)),
                                   _stage_of(overrides))
    merging = re.match(r"Error merging override (.+)", _first_line(text))
    if merging and cause is not None:  # a value of the wrong type for its key
        override = merging.group(1)
        reason = _first_line(str(cause))
        if "is not a ListConfig" in reason:
            key, _, value = override.partition("=")
            return f"{override}: {key.lstrip('+')} is a list; write {key.lstrip('+')}=[{value}]"
        return f"{override}: {reason}"
    in_option = re.match(r"In '([^']+)': ConfigKeyError raised while composing config:\s*Key '[^']+' not in "
                         r"'\w+'\s*full_key: (\S+)", text)
    if in_option:  # a group option (e.g. +rewards=oracle_strict) sets a key this stage does not have
        option, key = in_option.groups()
        stage = _stage_of(overrides)
        return f"{option.replace('/', '=', 1)}: {unknown_key_message(key, None, valid_keys(stage), stage)}"
    exists = re.search(r"An item is already at '([^']+)'", text)
    if exists:
        key = exists.group(1)
        return f"+{key}: {key} already exists; drop the + ({key}={_value_of(key, overrides)})"
    missing = re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    if missing:
        return f"~{missing.group(1)}: there is no such key to delete"
    ambiguous = re.search(r"Ambiguous value for argument '([^']+)'", text)
    if ambiguous:
        key, _, value = ambiguous.group(1).partition("=")
        return (f"{key}={value} is ambiguous: write {key}=[{value}] for a list, {key}='{value}' for a string, "
                "or add -m to sweep over the values")
    if isinstance(cause, ConfigError):
        return _one_line(str(cause))
    return _one_line(f"{_first_line(text)}" + (f": {_first_line(str(cause))}" if cause is not None else ""))


def command_line_overrides(argv: list[str] | None = None) -> list[str]:
    """The ``key=value`` arguments of a command line (flags and their values left out)."""
    argv = sys.argv[1:] if argv is None else argv
    return [a for a in argv if "=" in a and not a.startswith("-")]


def install() -> None:
    """Route Hydra's error reporting through ``describe``: a command-line mistake prints one line and exits 2.

    Hydra has no public hook for this: its ``run_and_report`` (hydra._internal.utils, Hydra 1.3) runs
    composition, callbacks and the job and prints errors. It is wrapped, not replaced: whatever ``describe``
    does not recognise goes to Hydra's own report.
    """
    from hydra._internal import utils

    original = utils.run_and_report
    if getattr(original, "marl_exp_wrapped", False):
        return

    def run_and_report(func):
        try:
            return func()
        except Exception as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            line = describe(err, command_line_overrides())
            if line is None:
                return original(lambda: _reraise(err))
            print(f"{PREFIX} {line}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CODE)

    run_and_report.marl_exp_wrapped = True
    utils.run_and_report = run_and_report


def _reraise(err: BaseException):
    raise err
