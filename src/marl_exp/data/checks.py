"""Checks on user data that fail with one line naming the file, column and row (or skip and count).

A bad row deep in a dataset would otherwise surface as a tokenizer error or a NaN hours into a run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset

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


def require_columns(dataset: Dataset, source: str, columns: dict[str, str]) -> None:
    """``columns`` maps config keys (``data.columns.prompt``) to the column names they ask for."""
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise DataError(f"{source} has no column {column!r} ({key}); its columns are "
                            f"{', '.join(dataset.column_names)}; set {key}=<one of them>")


def _has_text(value) -> bool:
    """A non-blank string, or a message list (TRL's conversational format) whose every turn has text."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip()
                                   for m in value)
    return isinstance(value, str) and bool(value.strip())


def drop_empty_rows(dataset: Dataset, source: str, columns: list[str], on_bad_row: str) -> Dataset:
    """Rows whose text in any of ``columns`` is missing or blank: an error naming the first, or dropped."""
    bad = []
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not _has_text(value):
                bad.append((row, column, value))
    if not bad:
        return dataset
    row, column, value = min(bad)
    if on_bad_row == "error":
        raise DataError(f"{source} row {row}, column {column!r} is {'empty' if value is not None else 'missing'} "
                        f"({len(bad)} empty or missing cells in all); fix the data or set data.on_bad_row=skip")
    bad_rows = {r for r, _, _ in bad}
    log.warning("%s: skipped %d rows with empty or missing %s", source, len(bad_rows), "/".join(columns))
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


def fit_pairs(pairs: Dataset, tokenizer, max_length: int, on_bad_row: str, what: str) -> Dataset:
    """Pairs with a side longer than ``max_length`` tokens, which RewardTrainer would drop without a word:
    an error naming how many and the longest, or (``on_bad_row=skip``, unless every pair is too long)
    dropped and counted."""
    chosen, rejected = pair_token_lengths(pairs, tokenizer)
    longest = [max(c, r) for c, r in zip(chosen, rejected)]
    too_long = [row for row, n in enumerate(longest) if n > max_length]
    if not too_long:
        return pairs
    worst = max(too_long, key=lambda row: longest[row])
    if on_bad_row == "error" or len(too_long) == len(pairs):
        raise DataError(f"{what}: {len(too_long)} of {len(pairs)} pairs are longer than stage.max_length={max_length} "
                        f"tokens as the reward trainer tokenizes them (the longest, row {worst}, has {longest[worst]}); "
                        f"raise stage.max_length (upstream.reward.max_length when an RL run trains the reward "
                        f"adapter) to at least {longest[worst]}, or set data.on_bad_row=skip to drop them")
    log.warning("%s: skipped %d of %d pairs longer than stage.max_length=%d tokens (the longest has %d)",
                what, len(too_long), len(pairs), max_length, longest[worst])
    skip = set(too_long)
    return pairs.select([row for row in range(len(pairs)) if row not in skip])
