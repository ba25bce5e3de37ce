"""The built-in ``reviews_chat`` task: the ``reviews`` task as conversations.

The user asks for a review that starts with an opening, the assistant writes the whole review::

    {"role": "user", "content": "review: the acting was"}
    {"role": "assistant", "content": "the acting was very dull . i hated it ."}

Same reviews, same pairs, same held-out openings as ``reviews`` (each row is the plain task's row
re-shaped), in TRL's conversational formats: SFT ``messages``; pairs ``prompt`` + ``chosen``/``rejected``
assistant turns; PPO prompts as message lists. The oracle scores the assistant turn's text.
"""

from __future__ import annotations

from datasets import Dataset

from marl_exp.data import reviews

USER_PREFIX = "review: "


def user_turn(opening: str, system_prompt: str | None = None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": USER_PREFIX + opening}]


def opening_of(text: str) -> str:
    """The review's opening (subject + verb): its first words that form one."""
    return next(o for o in sorted(reviews.openings(), key=len, reverse=True) if text.startswith(o))


def as_chat_task(plain, data_cfg):
    """The plain reviews ``Task`` re-shaped into conversations (its generators and splits unchanged)."""
    from marl_exp.data.task import Task

    system = getattr(data_cfg, "system_prompt", None)

    def sft(split: str) -> Dataset:
        texts = plain.sft_train["text"] if split == "train" else plain.sft_eval["text"]
        return Dataset.from_dict({"messages": [user_turn(opening_of(t), system) + [_assistant(t)] for t in texts]})

    def pairs(split: str) -> Dataset:
        data = plain.pairs_train if split == "train" else plain.pairs_eval
        return Dataset.from_dict({"prompt": [user_turn(opening_of(c), system) for c in data["chosen"]],
                                  "chosen": [[_assistant(c)] for c in data["chosen"]],
                                  "rejected": [[_assistant(r)] for r in data["rejected"]]})

    def prompts(split: str) -> tuple[list, list[str]]:
        openings = plain.prompts(split)
        return [user_turn(o, system) for o in openings], plain.prompt_origins[split]

    # The judges read the assistant turn, which is a whole review (opening included).
    return Task("reviews_chat", sft=sft, pairs=pairs, prompts=prompts, oracle=reviews.oracle_score,
                judge=reviews.well_formed, extra_eval_splits=plain.extra_eval_splits)


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
