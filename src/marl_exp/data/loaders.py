"""Real datasets through ``datasets``: IMDB, Anthropic HH-RLHF, and local files with a column mapping.

Each loader gives the three stages their data the way the classic TRL examples did:

- ``imdb`` (text, label): SFT on the reviews; pairs = a positive review (chosen) against a negative one;
  PPO prompts = the first ``data.prompt_words`` words of a review.
- ``hh_rlhf`` (chosen, rejected dialogues): SFT on the chosen dialogues; the pairs as given; PPO
  prompts = a dialogue up to and including its last ``Assistant:`` turn marker.
- ``local``: a file per split with ``data.columns`` naming the text / chosen / rejected / prompt columns;
  only the columns a stage needs must exist. A stage may read a file of its own (``data.sft_file``,
  ``data.pairs_file``, ``data.prompts_file``; held-out rows from the same file), else ``data.train_file``.
  Conversational files (TRL's formats, message lists) are recognised by their columns: SFT from ``messages``
  or ``prompt`` + ``completion``; pairs ``chosen`` / ``rejected`` message lists with an optional shared
  ``prompt``; prompts as message lists.
- ``hh_rlhf`` with ``data.conversational=true``: the dialogues as message lists (user / assistant turns).

``data.path`` is a hub id or a local directory of the same schema (``train.jsonl``, ``test.jsonl``, ...),
loaded by the same ``load_dataset`` call, which is how the tests run these loaders offline.

Errors name a row as its user counts it, before the seeded split and shuffle (``Source.row_name``).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from datasets import Dataset, load_dataset

from marl_exp.config import DATA_FILE_FORMATS
from marl_exp.config.data import STAGE_FILE_KEYS
from marl_exp.data.chat import is_conversational
from marl_exp.data.checks import DataError, check_utf8, drop_bad_cells, require_columns, require_rows

HH_ASSISTANT = "\n\nAssistant:"
SPLITS = ("train", "eval")
TASKS = ("imdb", "hh_rlhf", "local")
# Each row's 0-based position in its file or hub split, carried through the seeded split, shuffle and skips.
POSITION = "__marl_exp_position__"
# What each stage reads: the key of a file of its own (data=local) and how an error names its data.
STAGE_FILE = {"sft": STAGE_FILE_KEYS["sft"], "pairs": STAGE_FILE_KEYS["reward"], "prompts": STAGE_FILE_KEYS["rl"]}
WANTED_BY = {"sft": "the SFT stage's texts", "pairs": "the reward stage's preference pairs",
             "prompts": "the RL stage's prompts"}


class Source:
    """One split of the data one stage reads (``part``: sft, pairs, prompts), loaded on first use, with a name
    for error messages."""

    def __init__(self, data_cfg, split: str, part: str):
        self.cfg = data_cfg
        self.split = split
        self.part = part
        self._dataset: Dataset | None = None
        self._json_lines: list[int] | None = None

    @property
    def name(self) -> str:
        if self.cfg.name == "local":
            return str(self._file() or f"{self._train_file()} (held-out {self.cfg.eval_fraction:.0%})")
        return f"{self.cfg.path} [{self._split_name()}]"

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._load()
            require_rows(self._dataset, self.name)
        return self._dataset

    @property
    def column_names(self) -> list[str]:
        return [c for c in self.dataset.column_names if c != POSITION]

    def columns(self, **keys: str) -> Dataset:
        """The dataset with the columns ``keys`` (config key suffix → column) checked and bad cells handled."""
        dataset = self.dataset
        own_file = f"data.{STAGE_FILE[self.part]}" if self.cfg.name == "local" else ""
        require_columns(self.column_names, self.name, {f"data.columns.{k}": c for k, c in keys.items()},
                        WANTED_BY[self.part], own_file)
        text_columns = [c for k, c in keys.items() if k != "label"]
        dataset = drop_bad_cells(dataset, self.name, text_columns, self.cfg.on_bad_row, dataset[POSITION],
                                 self.row_name)
        require_rows(dataset, self.name)
        return self._cap(dataset)

    def row_name(self, position: int) -> str:
        """Where the row at ``position`` (0-based, in file or split order) is, as its user counts: a hub split's
        0-based index (as in ``dataset[row]``); a local file's 1-based line in JSON Lines, else its 1-based data
        row (a CSV's header not counted)."""
        if self.cfg.name != "local":
            return f"{self.name} row {position}"
        path = self._file() or self._train_file()
        if self._json_lines is not None:
            return f"{path} line {self._json_lines[position]}"
        return f"{path} data row {position + 1}"

    def row_names(self, rows: Dataset) -> list[str]:
        return [self.row_name(position) for position in rows[POSITION]]

    def _split_name(self) -> str:
        return self.cfg.train_split if self.split == "train" else self.cfg.eval_split

    def _own_file(self) -> str | None:
        """The stage's own file (``data.prompts_file`` ...), if given."""
        return getattr(self.cfg, STAGE_FILE[self.part], None)

    def _train_file(self) -> str:
        """The stage's own file, else the one training file every stage shares."""
        return self._own_file() or self.cfg.train_file

    def _holds_out(self) -> bool:
        """Whether the eval split is a seeded share of the training file: always for a stage's own file,
        else where no ``data.eval_file`` is given."""
        return bool(self._own_file()) or self.cfg.eval_file is None

    def _file(self) -> str | None:
        """This split's own file; None for an eval split held out from the training file."""
        if self.split == "train":
            return self._train_file()
        return None if self._holds_out() else self.cfg.eval_file

    def _cap(self, dataset: Dataset) -> Dataset:
        limit = self.cfg.max_train_samples if self.split == "train" else self.cfg.max_eval_samples
        if limit is None or len(dataset) <= limit:
            return dataset
        # Shuffled first: hub splits are often sorted (IMDB's train split by label).
        return dataset.shuffle(seed=self.cfg.seed).select(range(limit))

    def _load(self) -> Dataset:
        if self.cfg.name == "local":
            return self._load_local()
        try:
            return _with_positions(load_dataset(self.cfg.path, split=self._split_name()))
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise DataError(f"data.path={self.cfg.path!r} split {self._split_name()!r} could not be loaded "
                            f"({reason}); check the id/split, or download it while online or give a local "
                            "copy") from None

    def _load_local(self) -> Dataset:
        path = self._file() or self._train_file()
        dataset = _with_positions(_read_file(path))
        self._json_lines = _json_lines(path, len(dataset))
        if self._holds_out():  # no eval file: hold out a seeded share of the training file
            split = dataset.train_test_split(test_size=self.cfg.eval_fraction, seed=self.cfg.seed)
            dataset = split["test" if self.split == "eval" else "train"]
        return dataset


def _with_positions(dataset: Dataset) -> Dataset:
    return dataset.add_column(POSITION, list(range(len(dataset))))


def _json_lines(path: str, n_rows: int) -> list[int] | None:
    """The 1-based line of each record of a JSON Lines file (its reader skips blank lines); None for other
    formats and for a JSON array."""
    if DATA_FILE_FORMATS[Path(path).suffix.lower()] != "json":
        return None
    lines = _record_lines(path)
    if lines is None or len(lines) != n_rows:
        return None
    return [number for number, _ in lines]


def _record_lines(path: str) -> list[tuple[int, str]] | None:
    """(1-based line, text) of each non-blank line of a JSON Lines file; None for an empty file or a JSON array."""
    with open(path, encoding="utf-8") as handle:
        lines = [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]
    return None if not lines or lines[0][1].lstrip().startswith("[") else lines


def _read_file(path: str) -> Dataset:
    check_utf8(path)
    fmt = DATA_FILE_FORMATS[Path(path).suffix.lower()]
    try:
        return load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several types; say which file failed
        cause = err.__cause__ or err
        if isinstance(err, StopIteration) or "corresponds to no data" in str(err):  # how datasets says "empty"
            raise DataError(f"{path} has no rows; give a file with data in it") from None
        bad_line = _first_malformed_json_line(path) if fmt == "json" else None
        if bad_line is not None:  # name the line as the user counts it (the parser counts records from 0)
            raise DataError(f"{path} line {bad_line[0]} is not valid JSON ({bad_line[1]}); fix that line") from None
        raise DataError(f"{path}: could not be read as {fmt} ({str(cause).splitlines()[0]}); check the file "
                        "format") from None


def _first_malformed_json_line(path: str) -> tuple[int, str] | None:
    """(1-based line, reason) of the first line of a JSON Lines file that is not one JSON value; None for a
    JSON array file or a file whose every line parses."""
    for number, line in _record_lines(path) or []:
        try:
            json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            at = "" if err.msg.endswith(" at") else " at"  # some of json's messages end in "at" already
            return number, f"{err.msg}{at} column {err.colno}"
    return None


# ------------------------------------------------------------------------------------------ per dataset
def sft_texts(data_cfg, split: str) -> Dataset:
    return sft_rows(data_cfg, split)[0]


def preference_pairs(data_cfg, split: str) -> Dataset:
    return pair_rows(data_cfg, split)[0]


def row_names(data_cfg, part: str, split: str) -> list[str] | None:
    """Where each row of ``part`` ("sft" or "pairs") of a split came from, in the order the task gives them;
    None for tasks these loaders do not make."""
    if data_cfg.name not in TASKS:
        return None
    return {"sft": sft_rows, "pairs": pair_rows}[part](data_cfg, split)[1]


def sft_rows(data_cfg, split: str) -> tuple[Dataset, list[str]]:
    """SFT texts of a split and where each came from."""
    source = Source(data_cfg, split, "sft")
    conversational = _sft_conversations(data_cfg, source)
    if conversational is not None:
        return conversational
    column = data_cfg.columns.chosen if data_cfg.name == "hh_rlhf" else data_cfg.columns.text
    key = "chosen" if data_cfg.name == "hh_rlhf" else "text"
    dataset = source.columns(**{key: column})
    return Dataset.from_dict({"text": [_clean(data_cfg, t) for t in dataset[column]]}), source.row_names(dataset)


def pair_rows(data_cfg, split: str) -> tuple[Dataset, list[str]]:
    """Preference pairs of a split and where each came from."""
    source = Source(data_cfg, split, "pairs")
    if data_cfg.name == "imdb":
        return _imdb_pairs(data_cfg, source)
    columns = data_cfg.columns
    keys = {"chosen": columns.chosen, "rejected": columns.rejected}
    raw = source.dataset
    if data_cfg.name == "local" and columns.prompt in raw.column_names and columns.chosen in raw.column_names \
            and is_conversational(raw[0][columns.chosen]):
        keys = {"prompt": columns.prompt, **keys}  # TRL's explicit prompt: prompt + chosen vs prompt + rejected
    dataset = source.columns(**keys)
    if data_cfg.name == "hh_rlhf" and data_cfg.conversational:  # whole dialogues: TRL's implicit prompt
        pairs = Dataset.from_dict({side: [hh_messages(d, data_cfg.system_prompt) for d in dataset[column]]
                                   for side, column in keys.items()})
    else:
        pairs = Dataset.from_dict({side: list(dataset[column]) for side, column in keys.items()})
    return pairs, source.row_names(dataset)


def prompts(data_cfg, split: str) -> tuple[list[str], list[str]]:
    """PPO prompts of a split and where each came from (for error messages)."""
    source = Source(data_cfg, split, "prompts")
    columns = data_cfg.columns
    if data_cfg.name == "imdb":
        dataset = source.columns(text=columns.text)
        found = [" ".join(_clean(data_cfg, t).split()[:data_cfg.prompt_words]) for t in dataset[columns.text]]
    elif data_cfg.name == "hh_rlhf":
        dataset = source.columns(chosen=columns.chosen)
        dialogues = dataset[columns.chosen]
        found = [_hh_prompt(d, where) for d, where in zip(dialogues, source.row_names(dataset))]
        if data_cfg.conversational:  # the turns before the last assistant reply, as messages
            found = [hh_messages(d, data_cfg.system_prompt)[:-1] for d in dialogues]
    else:
        dataset = source.columns(prompt=columns.prompt)
        found = dataset[columns.prompt]
    return list(found), source.row_names(dataset)


def _imdb_pairs(data_cfg, source: Source) -> tuple[Dataset, list[str]]:
    """Each positive review against a negative one, paired in a seeded random order."""
    columns = data_cfg.columns
    dataset = source.columns(text=columns.text, label=columns.label)
    reviews = list(zip((_clean(data_cfg, t) for t in dataset[columns.text]), dataset[POSITION]))
    positive = [review for review, y in zip(reviews, dataset[columns.label]) if y == data_cfg.positive_label]
    negative = [review for review, y in zip(reviews, dataset[columns.label]) if y != data_cfg.positive_label]
    if not positive or not negative:
        raise DataError(f"{source.name}: pairs need both positive (label {data_cfg.positive_label}) and other "
                        "reviews; check data.positive_label and data.columns.label")
    rng = random.Random(data_cfg.seed)
    rng.shuffle(positive)
    rng.shuffle(negative)
    pairs = list(zip(positive, negative))
    return (Dataset.from_dict({"chosen": [c for (c, _), _ in pairs], "rejected": [r for _, (r, _) in pairs]}),
            [f"{source.row_name(chosen)} and row {rejected}" for (_, chosen), (_, rejected) in pairs])


# ------------------------------------------------------------------------------------ conversations
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(dialogue: str, system_prompt: str | None = None) -> list[dict]:
    """An hh-rlhf dialogue (``\\n\\nHuman: ...\\n\\nAssistant: ...``) as TRL's message list."""
    parts = _HH_TURN.split(dialogue)  # [before, role, text, role, text, ...]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": _HH_ROLES[role], "content": text.strip()}
                       for role, text in zip(parts[1::2], parts[2::2])]


def _sft_conversations(data_cfg, source: Source) -> tuple[Dataset, list[str]] | None:
    """SFT rows in a conversational format and where each came from, or None for plain text: hh-rlhf dialogues
    as ``messages`` (``data.conversational``); a local file with a ``messages`` column, or ``prompt`` +
    ``completion``."""
    columns = data_cfg.columns
    if data_cfg.name == "hh_rlhf" and data_cfg.conversational:
        rows = source.columns(chosen=columns.chosen)
        dialogues = Dataset.from_dict({"messages": [hh_messages(d, data_cfg.system_prompt)
                                                    for d in rows[columns.chosen]]})
        return dialogues, source.row_names(rows)
    if data_cfg.name != "local":
        return None
    names = source.column_names
    if columns.messages in names:
        rows = source.columns(messages=columns.messages)
        return Dataset.from_dict({"messages": list(rows[columns.messages])}), source.row_names(rows)
    if columns.text not in names and columns.prompt in names and columns.completion in names:
        rows = source.columns(prompt=columns.prompt, completion=columns.completion)
        return (Dataset.from_dict({"prompt": list(rows[columns.prompt]), "completion": list(rows[columns.completion])}),
                source.row_names(rows))
    return None


def _hh_prompt(dialogue: str, where: str) -> str:
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(f"{where}: no {HH_ASSISTANT.strip()!r} turn to cut a prompt at; "
                        "is this the hh-rlhf schema?")
    return dialogue[:cut + len(HH_ASSISTANT)]


def _clean(data_cfg, text: str) -> str:
    # IMDB reviews carry HTML line breaks; they are noise to a language model.
    return text.replace("<br />", " ") if data_cfg.name == "imdb" else text
