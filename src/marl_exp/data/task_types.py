"""The ``Task`` type: what a task gives each stage (SFT texts, preference pairs, PPO prompts, an optional
oracle and judge). The tasks themselves are built in ``task`` (and ``reviews_chat``, ``sentiment``)."""

from __future__ import annotations

from functools import cached_property
from typing import Callable

from datasets import Dataset

from marl_exp.data.checks import fit_prompts
from marl_exp.data.response_metrics import judged_text as generic_judged_text


class Task:
    """What each stage reads; a stage only loads (and checks) the parts it uses."""

    def __init__(self, name: str, sft: Callable[[str], Dataset], pairs: Callable[[str], Dataset],
                 prompts: Callable[[str], tuple[list[str], list[str]]], oracle: Callable[[str], float] | None = None,
                 judge: Callable[[str], bool] | None = None, extra_eval_splits: tuple[str, ...] = (),
                 judged_text: Callable | None = None, on_task: Callable[[object, str], bool] | None = None):
        self.name = name
        self._sft, self._pairs, self._prompts = sft, pairs, prompts
        # Ground-truth scorer of a full text in [0, 1]; None for real datasets that have none.
        self.oracle = oracle
        # Whether a full text is a well-formed answer (the strict gold is the oracle where it is, 0
        # elsewhere); None for real datasets.
        self.judge = judge
        # The text the judges read for (prompt, response): prompt + response, or a conversation's reply.
        self.judged_text = judged_text or generic_judged_text
        # Whether a response does what its prompt asks, read from (prompt, response): a check beside the judge
        # for tasks whose judge reads the response alone (a lexicon cannot tell a review from cheerful text).
        self.on_task = on_task
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
