"""A task gives each stage its data: SFT texts, preference pairs, PPO prompts, and an optional oracle and judge."""

from __future__ import annotations

from functools import cached_property, partial
from typing import Callable

from datasets import Dataset

from marl_exp.config import ConfigError
from marl_exp.data import loaders, reviews
from marl_exp.data.checks import fit_prompts
from marl_exp.ppo.response_metrics import judged_text as generic_judged_text


class Task:
    """What each stage reads; a stage only loads (and checks) the parts it uses."""

    def __init__(self, name: str, sft: Callable[[str], Dataset], pairs: Callable[[str], Dataset],
                 prompts: Callable[[str], tuple[list[str], list[str]]], oracle: Callable[[str], float] | None = None,
                 judge: Callable[[str], bool] | None = None, extra_eval_splits: tuple[str, ...] = (),
                 judged_text: Callable | None = None):
        self.name = name
        self._sft, self._pairs, self._prompts = sft, pairs, prompts
        # Ground-truth scorer of a full text in [0, 1]; None for real datasets that have none.
        self.oracle = oracle
        # Whether a full text is a well-formed answer (the strict gold is the oracle where it is, 0
        # elsewhere); None for real datasets.
        self.judge = judge
        # The text the judges read for (prompt, response): prompt + response, or a conversation's reply.
        self.judged_text = judged_text or generic_judged_text
        # Prompt splits evaluated beside "eval" (reported as eval/<tag>/<split>/<metric>).
        self.extra_eval_splits = tuple(extra_eval_splits)
        self.prompt_origins: dict[str, list[str]] = {}
        self._prompt_splits: dict[str, list[str]] = {}

    @cached_property
    def sft_train(self) -> Dataset:  # column "text"
        return self._sft("train")

    @cached_property
    def sft_eval(self) -> Dataset:
        return self._sft("eval")

    @cached_property
    def pairs_train(self) -> Dataset:  # columns "chosen", "rejected" (full texts)
        return self._pairs("train")

    @cached_property
    def pairs_eval(self) -> Dataset:
        return self._pairs("eval")

    @property
    def prompts_train(self) -> list[str]:
        return self.prompts("train")

    @property
    def prompts_eval(self) -> list[str]:
        return self.prompts("eval")

    def prompts(self, split: str) -> list[str]:
        """PPO prompts of ``split``: "train", "eval" (the headline evaluation) or one of ``extra_eval_splits``."""
        if split not in self._prompt_splits:
            self._prompt_splits[split], self.prompt_origins[split] = self._prompts(split)
        return self._prompt_splits[split]

    def fit_prompts(self, tokenizer, max_prompt_tokens: int, on_bad_row: str, reward_tokens: int = 0) -> None:
        """Check (or drop, with ``on_bad_row=skip``) prompts that leave no room for the response and the
        ``reward_tokens`` the reward model reads after it (``checks.fit_prompts``)."""
        for split in ("train", "eval", *self.extra_eval_splits):
            prompts = self.prompts(split)
            self._prompt_splits[split] = fit_prompts(prompts, self.prompt_origins[split], tokenizer, max_prompt_tokens,
                                                     on_bad_row, what=f"{self.name} {split} prompts",
                                                     reward_tokens=reward_tokens)


def build_task(data_cfg, model_dir: str | None = None) -> Task:
    """The task ``data.name`` names. ``model_dir``: the base whose own replies make a task's preference pairs
    (``movie_sentiment``; the reward stage passes its SFT model); other tasks ignore it."""
    if data_cfg.name == "reviews":
        return _reviews_task(data_cfg)
    if data_cfg.name == "reviews_chat":  # the same task as conversations (marl_exp.data.reviews_chat)
        from marl_exp.data.reviews_chat import as_chat_task

        return as_chat_task(_reviews_task(data_cfg), data_cfg)
    if data_cfg.name == "movie_sentiment":  # instruct models, offline (marl_exp.data.sentiment)
        from marl_exp.data.sentiment import sentiment_task

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
