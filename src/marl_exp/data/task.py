"""A task gives each stage its data: SFT texts, preference pairs, PPO prompts, and an optional oracle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from datasets import Dataset

from marl_exp.config import ConfigError
from marl_exp.data import reviews


@dataclass
class Task:
    name: str
    sft_train: Dataset  # column "text"
    sft_eval: Dataset
    pairs_train: Dataset  # columns "chosen", "rejected" (full texts)
    pairs_eval: Dataset
    prompts_train: list[str]
    prompts_eval: list[str]
    # Ground-truth scorer of a full text in [0, 1]; None for real datasets that have none.
    oracle: Callable[[str], float] | None = None


def build_task(data_cfg) -> Task:
    if data_cfg.name == "reviews":
        return _reviews_task(data_cfg)
    raise ConfigError(f"data.name={data_cfg.name!r} is not a known task; use data=reviews")


def _reviews_task(data_cfg) -> Task:
    # Each split has its own generator seed, so held-out data never overlaps the training stream.
    def texts(offset: int, n: int) -> Dataset:
        generator = reviews.ReviewGenerator(data_cfg.seed + offset)
        return Dataset.from_dict({"text": [generator.review().text for _ in range(n)]})

    def pairs(offset: int, n: int, augmented: bool) -> Dataset:
        # Training pairs are augmented (unfinished, spliced, more negation: see config.DataConfig);
        # held-out pairs are the task's own reviews, so accuracy measures the task, not the augmentation.
        extra = {"negation_prob": data_cfg.pair_negation_prob} if augmented else {}
        generator = reviews.ReviewGenerator(data_cfg.seed + offset, **extra)
        truncate, splice = (data_cfg.pair_truncate_prob, data_cfg.pair_splice_prob) if augmented else (0.0, 0.0)
        chosen, rejected = zip(*(generator.preference_pair(data_cfg.pair_min_gap, truncate, splice)
                                 for _ in range(n)))
        return Dataset.from_dict({"chosen": [r.text for r in chosen], "rejected": [r.text for r in rejected]})

    openings = reviews.openings()
    n_verbs = len(reviews.VERBS)
    held_out = {i for i in range(len(openings)) if i % n_verbs == (i // n_verbs) % n_verbs}
    return Task(
        name="reviews",
        sft_train=texts(0, data_cfg.num_sft_train),
        sft_eval=texts(1, data_cfg.num_sft_eval),
        pairs_train=pairs(2, data_cfg.num_pairs_train, augmented=True),
        pairs_eval=pairs(3, data_cfg.num_pairs_eval, augmented=False),
        prompts_train=[o for i, o in enumerate(openings) if i not in held_out],
        prompts_eval=[o for i, o in enumerate(openings) if i in held_out],
        oracle=reviews.oracle_score,
    )
