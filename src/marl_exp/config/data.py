"""Schema of the data group (``conf/data``): the built-in task, real datasets and local files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


DATA_NAMES = ("reviews", "reviews_chat", "movie_sentiment", "imdb", "hh_rlhf", "local")
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# What a task's judge calls a reply it accepts (eval/*/well_formed is the share of them), for the console. The
# reviews tasks' judge is the grammar (well formed); movie_sentiment's is AFINN (a score > 0).
JUDGE_LABELS = {"movie_sentiment": "AFINN positive"}


def judge_label(data_name: str) -> str:
    return JUDGE_LABELS.get(data_name, "well formed")


# data=local: the key of the file of its own each stage may read (an RL stage reads prompts), else train_file.
STAGE_FILE_KEYS = {"sft": "sft_file", "reward": "pairs_file", "rl": "prompts_file"}


@dataclass
class DataColumns:
    """Which column holds what, for datasets whose names differ (``data.columns.prompt=question``)."""

    text: str = "text"  # SFT texts
    chosen: str = "chosen"  # preference pairs
    rejected: str = "rejected"
    prompt: str = "prompt"  # PPO prompts
    label: str = "label"  # imdb: sentiment label
    # ---- conversational rows (TRL's formats, message lists): see README "Conversations"
    messages: str = "messages"  # SFT from whole conversations
    completion: str = "completion"  # SFT from prompt + completion (both message lists)


@dataclass
class DataConfig:
    name: str = "reviews"  # reviews (built-in) | imdb | hh_rlhf | local
    seed: int = 1234  # the task itself is fixed by this seed, independent of the run's seed

    # ---- real datasets (imdb, hh_rlhf: a hub id or a local copy of the same schema)
    path: Optional[str] = None
    train_split: str = "train"
    eval_split: str = "test"
    # ---- local files (json, jsonl, csv, parquet); no eval file = hold out eval_fraction of the rows
    train_file: Optional[str] = None
    eval_file: Optional[str] = None
    # One file per stage, in place of train_file for that stage (its held-out rows: eval_fraction of it):
    # SFT texts, the reward stage's preference pairs, the RL stages' prompts. A stage without one reads
    # train_file (and eval_file), so one file with every column still serves the whole chain.
    sft_file: Optional[str] = None
    pairs_file: Optional[str] = None
    prompts_file: Optional[str] = None
    eval_fraction: float = 0.05
    columns: DataColumns = field(default_factory=DataColumns)
    max_train_samples: Optional[int] = None  # cap on rows used per split (None = all)
    max_eval_samples: Optional[int] = 500
    positive_label: int = 1  # imdb: the label of positive reviews (chosen side of the pairs)
    prompt_words: int = 6  # imdb: a PPO prompt is the first words of a review
    # Rows with empty text or prompts too long for the context: error (default) or skip and count.
    on_bad_row: str = "error"
    num_sft_train: int = 4000
    num_sft_eval: int = 400
    num_pairs_train: int = 6000
    num_pairs_eval: int = 400
    # How preference pairs are ordered. strict (reviews.strict_preference): a well-formed review beats any
    # ill-formed text, two reviews need an oracle-score gap of at least pair_min_gap (ambiguous pairs teach
    # nothing), two ill-formed texts make no pair; the labelling the strict evaluation calls for. plain: every
    # pair by the plain oracle's gap, so a stub with positive words beats a finished review (a reward that
    # teaches stubs; use it with truncate/splice 0.2 / 0.2 and no edits).
    pair_gold: str = "strict"
    pair_min_gap: float = 0.25
    # Share of training-pair sides that are unfinished reviews, so the reward model learns that they rank
    # below any review (else the policy learns to stop early on a stub the reward model happens to like).
    # A pair with one ill-formed side teaches grammar only (its sentiment does not decide it), so these
    # shares set the mix of grammar and sentiment pairs: keep truncate + splice small (0.1 each with
    # pair_gold=strict) or too few sentiment pairs remain (docs/data.md).
    pair_truncate_prob: float = 0.1
    # Negated units in the pairs ("not boring"): more than in the SFT corpus (0.15), so the reward
    # model learns that "not" flips polarity (else the policy exploits it with "not great").
    pair_negation_prob: float = 0.25
    # Share of training-pair sides with a stretch of another review spliced in (mostly off-grammar text
    # such as two closings), so the reward model learns that they rank below any review too (0.1 with strict).
    pair_splice_prob: float = 0.1
    # Share of training-pair sides with one word inserted, deleted, repeated or swapped (reviews.edited): the
    # small damages a drifting policy writes first ("great great", "i loved it it"), which a reward model taught
    # only truncations and splices scored like reviews.
    pair_edit_prob: float = 0.2
    # reviews_chat: the assistant writes the opening, so this share of the training pairs' chosen reviews gets
    # one more pair against itself with its opening swapped or garbled (reviews_chat.request_contrast_pairs).
    pair_request_contrast_prob: float = 0.0

    # ---- conversations (instruct models; marl_exp.data.chat)
    # The chat template: null = the tokenizer's own; a name in conf/chat_templates/ (chatml) or a .jinja file.
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None  # reviews_chat / hh_rlhf conversations: a system turn first (null = none)
    conversational: bool = False  # hh_rlhf: load the dialogues as message lists rather than raw text

