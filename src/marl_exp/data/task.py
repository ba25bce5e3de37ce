"""A task gives each stage its data: SFT texts, preference pairs, PPO prompts, and an optional oracle and judge."""

from __future__ import annotations

from functools import partial

from datasets import Dataset

from marl_exp.config import ConfigError
from marl_exp.data import loaders, reviews
from marl_exp.data.reviews_chat import as_chat_task
from marl_exp.data.sentiment import sentiment_task
from marl_exp.data.task_types import Task

__all__ = ["Task", "build_task"]


def build_task(data_cfg, model_dir: str | None = None) -> Task:
    """The task ``data.name`` names. ``model_dir``: the base whose own replies make a task's preference pairs
    (``movie_sentiment``; the reward stage passes its SFT model); other tasks ignore it."""
    if data_cfg.name == "reviews":
        return _reviews_task(data_cfg)
    if data_cfg.name == "reviews_chat":  # the same task as conversations (marl_exp.data.reviews_chat)
        return as_chat_task(_reviews_task(data_cfg), data_cfg)
    if data_cfg.name == "movie_sentiment":  # instruct models, offline (marl_exp.data.sentiment)
        return sentiment_task(data_cfg, model_dir)
    if data_cfg.name in ("imdb", "hh_rlhf", "local"):
        return Task(data_cfg.name, partial(loaders.sft_texts, data_cfg), partial(loaders.preference_pairs, data_cfg),
                    partial(loaders.prompts, data_cfg))
    raise ConfigError(f"data.name={data_cfg.name!r} is not a known task; use data=reviews, reviews_chat, movie_sentiment, "
                      "imdb, hh_rlhf or local")


def _reviews_task(data_cfg) -> Task:
    # Openings: the headline evaluation ("eval") takes one per training subject, the verb rotating; they
    # are in the SFT corpus (the policy has seen them) but never in PPO's training prompts or the
    # training preference pairs. "unseen_subjects" opens with subjects no training text ever contains.
    sft_openings = reviews.openings()
    n_verbs = len(reviews.VERBS)
    held_out = [o for i, o in enumerate(sft_openings) if i % n_verbs == (i // n_verbs) % n_verbs]
    prompt_splits = {"train": [o for o in sft_openings if o not in held_out], "eval": held_out,
                     "unseen_subjects": reviews.openings(reviews.UNSEEN_SUBJECTS)}

    # Each split has its own generator seed, so held-out data never overlaps the training stream.
    def texts(offset: int, n: int, exclude=()) -> Dataset:
        generator = reviews.ReviewGenerator(data_cfg.seed + offset)
        return Dataset.from_dict({"text": generator.review_texts(n, exclude)})

    def sft_texts(split: str) -> Dataset:
        # Held-out reviews skip the training ones, which independent draws of a small grammar repeat.
        train = texts(0, sizes["train"][0])
        return train if split == "train" else texts(1, sizes["eval"][0], exclude=set(train["text"]))

    def pairs(offset: int, n: int, augmented: bool) -> Dataset:
        # Training pairs are augmented (unfinished, spliced, more negation: see config.DataConfig) and
        # avoid the evaluation openings; held-out pairs are the task's own reviews over every training
        # opening, so accuracy measures the task, not the augmentation. Both are ordered by data.pair_gold.
        extra = ({"negation_prob": data_cfg.pair_negation_prob, "opening_pool": prompt_splits["train"]}
                 if augmented else {})
        generator = reviews.ReviewGenerator(data_cfg.seed + offset, **extra)
        truncate, splice = (data_cfg.pair_truncate_prob, data_cfg.pair_splice_prob) if augmented else (0.0, 0.0)
        edit = data_cfg.pair_edit_prob if augmented else 0.0
        chosen, rejected = zip(*(generator.preference_pair(data_cfg.pair_min_gap, truncate, splice, data_cfg.pair_gold,
                                                           edit)
                                 for _ in range(n)))
        return Dataset.from_dict({"chosen": [r.text for r in chosen], "rejected": [r.text for r in rejected]})

    def reviews_prompts(split: str) -> tuple[list[str], list[str]]:
        chosen = prompt_splits[split]
        return list(chosen), [f"reviews {split} opening {i} ({o!r})" for i, o in enumerate(chosen)]

    sizes = {"train": (data_cfg.num_sft_train, data_cfg.num_pairs_train),
             "eval": (data_cfg.num_sft_eval, data_cfg.num_pairs_eval)}
    return Task(
        "reviews",
        sft=sft_texts,
        pairs=lambda split: pairs(2 if split == "train" else 3, sizes[split][1], augmented=split == "train"),
        prompts=reviews_prompts,
        oracle=reviews.oracle_score,
        judge=reviews.well_formed,
        extra_eval_splits=("unseen_subjects",),
    )
