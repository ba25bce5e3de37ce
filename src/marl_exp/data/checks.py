"""Checks on user data that fail with one line naming the file, column and row (or skip and count).

A bad row deep in a dataset would otherwise surface as a tokenizer error or a NaN hours into a run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from datasets import Dataset
from trl.data_utils import common_prefix_length

from marl_exp.config import ConfigError
from marl_exp.data.chat import is_conversational, prompt_length, reward_sequences

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """Bad input data (a user error like a bad config: one line, exit code 2)."""


def check_utf8(path: str | Path) -> None:
    """Text formats must be UTF-8: say which line is not, instead of a decoder traceback."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: line {line_number} is not UTF-8 (byte 0x{line[err.start]:02x} at column "
                                f"{err.start + 1}); re-save the file as UTF-8") from None


def require_rows(dataset: Dataset, source: str) -> None:
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows; give a dataset with data in it")


def require_columns(present: list[str], source: str, columns: dict[str, str], wanted_by: str = "",
                    own_file_key: str = "") -> None:
    """``columns`` maps config keys (``data.columns.prompt``) to the column names they ask for; ``wanted_by``
    names the stage's data that needs them, ``own_file_key`` the key that gives that stage a file of its own."""
    for key, column in columns.items():
        if column not in present:
            need = f", which {wanted_by} need" if wanted_by else ""
            own = f", or give the stage a file of its own: {own_file_key}=<file>" if own_file_key else ""
            raise DataError(f"{source} has no column {column!r} ({key}){need}; its columns are "
                            f"{', '.join(present)}; set {key}=<one of them>{own}")


def _is_message_list(value: list) -> bool:
    return all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)


def text_problem(value) -> str | None:
    """What keeps a cell from being text, or None: text is a non-blank string, or a message list (TRL's
    conversational format) whose every turn has text."""
    if value is None:
        return "missing"
    if isinstance(value, str):
        return None if value.strip() else "empty"
    if isinstance(value, list) and _is_message_list(value):
        return None if value and all(m["content"].strip() for m in value) else "empty"
    if isinstance(value, bool):  # before numbers: a bool is an int
        return f"true/false ({json.dumps(value)}) where text belongs"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)}) where text belongs"
    kind = {dict: "an object", list: "a list that is not messages ({role, content} with text)"}.get(type(value))
    return f"{kind or 'a ' + type(value).__name__} where text belongs"


def drop_bad_cells(dataset: Dataset, source: str, columns: list[str], on_bad_row: str, positions: list[int],
                   row_name: Callable[[int], str]) -> Dataset:
    """Rows whose cell in any of ``columns`` is not text (``text_problem``): an error naming the first in the
    user's file (``positions``: each row's place there; ``row_name``: how the user finds it), or dropped."""
    bad = []  # (position, column, problem, row)
    for column in columns:
        for row, (value, position) in enumerate(zip(dataset[column], positions)):
            problem = text_problem(value)
            if problem is not None:
                bad.append((position, column, problem, row))
    if not bad:
        return dataset
    position, column, problem, _ = min(bad)
    if on_bad_row == "error":
        raise DataError(f"{row_name(position)}, column {column!r} is {problem} ({len(bad)} bad cell"
                        f"{'s' if len(bad) > 1 else ''} in all); fix the data or set data.on_bad_row=skip")
    bad_rows = {row for *_, row in bad}
    log.warning("%s: skipped %d rows with empty, missing or non-text %s", source, len(bad_rows), "/".join(columns))
    return dataset.select([i for i in range(len(dataset)) if i not in bad_rows])


def reward_end_tokens(tokenizer, conversational: bool) -> int:
    """How many tokens the reward model's input may hold beyond the policy's prompt + response: the EOS
    ``rollout.reward_inputs`` appends to a plain text cut at ``max_new_tokens``; for a conversation, what the
    chat template writes after the assistant's reply (``<|im_end|>\\n``), measured on a probe turn."""
    if not conversational:
        return 1
    prompt, reply = [{"role": "user", "content": "hi"}], "ok"
    head = prompt_length(tokenizer, prompt)
    whole = reward_sequences(tokenizer, [prompt], [reply])[0]
    return max(0, len(whole) - head - len(tokenizer(reply, add_special_tokens=False).input_ids))


def fit_prompts(prompts: list[str], origins: list[str], tokenizer, max_prompt_tokens: int, on_bad_row: str,
                what: str, reward_tokens: int = 0) -> list[str]:
    """Prompts longer than ``max_prompt_tokens`` (context minus the response) less ``reward_tokens`` (what the
    reward model reads after the response, ``reward_end_tokens``): an error, or skipped."""
    budget = max_prompt_tokens - reward_tokens
    if prompts and is_conversational(prompts[0]):  # message lists: as the chat template renders them
        lengths = [prompt_length(tokenizer, p) for p in prompts]
    else:
        lengths = [len(ids) for ids in tokenizer(prompts).input_ids]
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if not too_long:
        return prompts
    first = too_long[0]
    if on_bad_row == "error" or len(too_long) == len(prompts):
        after = (f" and the {reward_tokens} token{'s' if reward_tokens > 1 else ''} the reward model reads after it"
                 if reward_tokens else "")
        raise DataError(f"{origins[first]}: prompt has {lengths[first]} tokens, more than the {budget} "
                        f"that fit in the context with the response{after} ({len(too_long)} such prompts in {what}); "
                        "shorten them, lower stage.sampling.max_new_tokens or set data.on_bad_row=skip")
    log.warning("%s: skipped %d of %d prompts longer than %d tokens", what, len(too_long), len(prompts), budget)
    skip = set(too_long)
    return [p for i, p in enumerate(prompts) if i not in skip]


def pair_token_lengths(pairs: Dataset, tokenizer) -> tuple[list[int], list[int]]:
    """Token counts of each pair's chosen and rejected side as TRL's RewardTrainer tokenizes them: the shared
    ``prompt`` (when given) + the side; plain text with EOS appended, a conversation through the chat template."""
    sides = []
    for side in ("chosen", "rejected"):
        texts = list(pairs[side])
        if "prompt" in pairs.column_names:
            texts = [prompt + text for prompt, text in zip(pairs["prompt"], texts)]
        if texts and is_conversational(texts[0]):
            sides.append([len(tokenizer.apply_chat_template(t, tokenize=True, return_dict=True)["input_ids"])
                          for t in texts])
        else:
            eos = tokenizer.eos_token
            sides.append([len(ids) for ids in tokenizer([t if t.endswith(eos) else t + eos for t in texts]).input_ids])
    return sides[0], sides[1]


def fit_pairs(pairs: Dataset, tokenizer, max_length: int, on_bad_row: str, what: str,
              row_names: Callable[[], list[str] | None] = lambda: None) -> Dataset:
    """Pairs with a side longer than ``max_length`` tokens, which RewardTrainer would drop without a word:
    an error naming how many and the longest, or (``on_bad_row=skip``, unless every pair is too long)
    dropped and counted. ``row_names``: where each pair came from, asked for only when a message names one."""
    chosen, rejected = pair_token_lengths(pairs, tokenizer)
    longest = [max(c, r) for c, r in zip(chosen, rejected)]
    too_long = [row for row, n in enumerate(longest) if n > max_length]
    if not too_long:
        return pairs
    worst = max(too_long, key=lambda row: longest[row])
    where = (row_names() or [f"row {row}" for row in range(len(pairs))])[worst]
    if on_bad_row == "error" or len(too_long) == len(pairs):
        raise DataError(f"{what}: {len(too_long)} of {len(pairs)} pairs are longer than stage.max_length={max_length} "
                        f"tokens as the reward trainer tokenizes them (the longest, {where}, has {longest[worst]}); "
                        f"raise stage.max_length (upstream.reward.max_length when an RL run trains the reward "
                        f"adapter) to at least {longest[worst]}, or set data.on_bad_row=skip to drop them")
    log.warning("%s: skipped %d of %d pairs longer than stage.max_length=%d tokens (the longest, %s, has %d)",
                what, len(too_long), len(pairs), max_length, where, longest[worst])
    skip = set(too_long)
    return pairs.select([row for row in range(len(pairs)) if row not in skip])


def sft_token_lengths(texts: Dataset, tokenizer) -> tuple[list[int], list[int]]:
    """Token count of each SFT example as TRL's SFTTrainer tokenizes it, and of its prompt, which trains
    nothing (0 without one): plain text with EOS appended, a conversation through the chat template."""
    rows = texts.to_list()
    if "prompt" not in texts.column_names:  # language modelling: every token trains
        return [len(_sft_ids(tokenizer, row.get("messages", row.get("text")))) for row in rows], [0] * len(rows)
    whole, prompts = [], []
    for row in rows:
        ids = _sft_ids(tokenizer, row["prompt"] + row["completion"])
        # As TRL: the completion starts where the prompt's ids and the whole's part (a template may render them apart).
        alone = _sft_ids(tokenizer, row["prompt"], prompt_only=True)
        whole.append(len(ids))
        prompts.append(common_prefix_length(alone, ids))
    return whole, prompts


def _sft_ids(tokenizer, text, prompt_only: bool = False) -> list[int]:
    if is_conversational(text):
        return tokenizer.apply_chat_template(text, tokenize=True, return_dict=True,
                                             add_generation_prompt=prompt_only)["input_ids"]
    eos = tokenizer.eos_token
    return tokenizer(text if prompt_only or text.endswith(eos) else text + eos).input_ids


def fit_sft_texts(texts: Dataset, tokenizer, max_length: int, on_bad_row: str, what: str,
                  row_names: Callable[[], list[str] | None] = lambda: None) -> Dataset:
    """SFT examples longer than ``max_length`` tokens, which SFTTrainer cuts to their first ``max_length``: a
    language model trains on a window, so they train, and one warning counts them. An example whose prompt
    fills the window has nothing left to train, and SFTTrainer would drop it without a word: an error naming
    how many and the longest, or (``on_bad_row=skip``, unless it is every example) dropped and counted.
    ``row_names``: where each example came from, asked for only when a message names one."""
    lengths, prompts = sft_token_lengths(texts, tokenizer)
    too_long = [row for row, n in enumerate(lengths) if n > max_length]
    if not too_long:
        return texts
    names = row_names() or [f"row {row}" for row in range(len(texts))]
    untrainable = [row for row in too_long if prompts[row] >= max_length]
    if untrainable:
        worst = max(untrainable, key=lambda row: prompts[row])
        if on_bad_row == "error" or len(untrainable) == len(texts):
            raise DataError(f"{what}: {len(untrainable)} of {len(texts)} prompts fill stage.max_length={max_length} "
                            f"tokens, leaving no completion to train on (the longest, {names[worst]}, has "
                            f"{prompts[worst]}); raise {_SFT_LENGTH_KEY} to more than {prompts[worst]}, or set "
                            "data.on_bad_row=skip to drop them")
        log.warning("%s: skipped %d of %d examples whose prompt fills stage.max_length=%d tokens (the longest, %s, "
                    "has %d)", what, len(untrainable), len(texts), max_length, names[worst], prompts[worst])
    cut = [row for row in too_long if prompts[row] < max_length]
    if cut:
        worst = max(cut, key=lambda row: lengths[row])
        log.warning("%s: %d of %d examples are longer than stage.max_length=%d tokens and train on their first %d "
                    "only (the longest, %s, has %d); raise %s to at least %d to train on them whole", what, len(cut),
                    len(texts), max_length, max_length, names[worst], lengths[worst], _SFT_LENGTH_KEY, lengths[worst])
    skip = set(untrainable)
    return texts.select([row for row in range(len(texts)) if row not in skip]) if skip else texts


_SFT_LENGTH_KEY = "stage.max_length (upstream.sft.max_length when a reward or RL run trains the SFT model)"
# Fewer held-out rows than this: one row moves a held-out rate by more than 0.1.
FEW_HELD_OUT = 10


def warn_if_few_held_out(n: int, unit: str, metric: str, what: str) -> None:
    """A held-out rate from a handful of rows is noise: say so rather than report it in silence. ``unit``:
    what a row is ("pair"); ``metric``: the rate ("pairwise accuracy")."""
    if n < FEW_HELD_OUT:
        log.warning("%s: held-out %s from %d %s%s is noise (each moves it by %.2f); hold out at least %d (a local "
                    "file: data.eval_file or a larger data.eval_fraction)", what, metric, n, unit, "" if n == 1 else "s",
                    1 / max(n, 1), FEW_HELD_OUT)
