"""The built-in ``reviews_chat`` task: the ``reviews`` task as conversations.

The user asks for a review that starts with an opening, the assistant writes the whole review::

    {"role": "user", "content": "review: the acting was"}
    {"role": "assistant", "content": "the acting was very dull . i hated it ."}

Same reviews, same pairs, same held-out openings as ``reviews`` (each row is the plain task's row
re-shaped), in TRL's conversational formats: SFT ``messages``; pairs ``prompt`` + ``chosen``/``rejected``
assistant turns; PPO prompts as message lists. The oracle scores the assistant turn's text.
"""

from __future__ import annotations

import random

from datasets import Dataset

from marl_exp.data import reviews
from marl_exp.data.response_metrics import judged_text as generic_judged_text
from marl_exp.data.task_types import Task

USER_PREFIX = "review: "


def user_turn(opening: str, system_prompt: str | None = None) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": USER_PREFIX + opening}]


def opening_of(text: str) -> str:
    """The review's opening (subject + verb): its first words that form one."""
    return next(o for o in sorted(reviews.openings(), key=len, reverse=True) if text.startswith(o))


def as_chat_task(plain, data_cfg):
    """The plain reviews ``Task`` re-shaped into conversations (its generators and splits unchanged)."""
    system = getattr(data_cfg, "system_prompt", None)

    def sft(split: str) -> Dataset:
        texts = plain.sft_train["text"] if split == "train" else plain.sft_eval["text"]
        return Dataset.from_dict({"messages": [user_turn(opening_of(t), system) + [_assistant(t)] for t in texts]})

    def pairs(split: str) -> Dataset:
        data = plain.pairs_train if split == "train" else plain.pairs_eval
        chosen, rejected = list(data["chosen"]), list(data["rejected"])
        if split == "train":  # held-out pairs stay the task's own reviews: accuracy measures the task
            extra = request_contrast_pairs(chosen, data_cfg.pair_request_contrast_prob, data_cfg.seed + 4)
            chosen, rejected = chosen + [c for c, _ in extra], rejected + [r for _, r in extra]
        return Dataset.from_dict({"prompt": [user_turn(opening_of(c), system) for c in chosen],
                                  "chosen": [[_assistant(c)] for c in chosen],
                                  "rejected": [[_assistant(r)] for r in rejected]})

    def prompts(split: str) -> tuple[list, list[str]]:
        openings = plain.prompts(split)
        return [user_turn(o, system) for o in openings], plain.prompt_origins[split]

    # The judges read the assistant turn as the review it gives for the requested opening (judged_text).
    return Task("reviews_chat", sft=sft, pairs=pairs, prompts=prompts, oracle=reviews.oracle_score,
                judge=reviews.well_formed, extra_eval_splits=plain.extra_eval_splits, judged_text=judged_text)


def requested_opening(prompt: list[dict]) -> str | None:
    """The opening the last user turn asks the review to start with (None: not a review request)."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1][len(USER_PREFIX):].strip() if users and users[-1].startswith(USER_PREFIX) else None


def judged_text(prompt, reply: str) -> str:
    """The review a reply gives, as the judges read it. The assistant must write the review that starts with
    the requested opening: a reply that starts with it is read as it is; any other reply is read after the
    opening, as the plain task reads a continuation (``great . i liked it .`` to ``review: the movie was``
    is ``the movie was great . i liked it .``; a reply about another subject is then not well formed).
    Without this, a policy could give one well-formed review to every request. Plain prompts: prompt + reply."""
    if isinstance(prompt, str):
        return generic_judged_text(prompt, reply)
    opening = requested_opening(prompt)
    if opening is None or reply.strip().startswith(opening):
        return reply
    return f"{opening} {reply.strip()}"


def request_contrast_pairs(chosen: list[str], share: float, seed: int) -> list[tuple[str, str]]:
    """For a ``share`` of the training pairs' chosen reviews, one more pair: the review against the same review
    with its opening damaged (``damaged_opening``). In the plain task the opening is the prompt; here the
    assistant writes it, so a policy can swap its subject or verb (``this show is`` for ``this film is``) or
    garble it, and a reward model that never saw such replies scores them like the requested review. Each
    pair is ordered by the strict gold on the replies as the judges read them against the request, also under
    ``data.pair_gold=plain`` (whose oracle cannot tell a swapped subject from the requested one)."""
    rng = random.Random(seed)
    pool = sorted({opening_of(review) for review in chosen})  # the training openings: held-out ones stay out
    pairs = []
    for review in chosen:
        if rng.random() >= share:
            continue
        opening = opening_of(review)
        request = user_turn(opening)
        damaged = damaged_opening(review, opening, pool, rng)
        if reviews.strict_preference(judged_text(request, review), judged_text(request, damaged), 0.0) > 0:
            pairs.append((review, damaged))
    return pairs


def damaged_opening(review: str, opening: str, pool: list[str], rng: random.Random) -> str:
    """``review`` with its opening damaged, each way a third of the time: its subject swapped (another opening of
    ``pool`` with the same verb), its verb swapped (same subject), or one word of it deleted, repeated or
    replaced. What a policy that drifts from the request writes first; a reward model taught subject swaps
    only still scored ``the story is`` for ``the story was`` like the requested review."""
    body = review[len(opening):]
    subject, verb = opening.rsplit(" ", 1)
    kind = rng.choice(("subject", "verb", "edit"))
    if kind != "edit":
        near = [o for o in pool if o != opening and
                (o.endswith(" " + verb) if kind == "subject" else o.startswith(subject + " "))]
        if near:
            return rng.choice(near) + body
    words = opening.split(" ")
    at = rng.randrange(len(words))
    edit = rng.choice(("delete", "repeat", "replace"))
    if edit == "delete":
        del words[at]
    elif edit == "repeat":
        words.insert(at, words[at])
    else:  # never into another opening: that would be a swap, possibly to a held-out one
        words[at] = rng.choice([w for w in _OPENING_WORDS
                                if " ".join(words[:at] + [w] + words[at + 1:]) not in _ALL_OPENINGS])
    return " ".join(words) + body


_ALL_OPENINGS = frozenset(reviews.openings()) | frozenset(reviews.openings(reviews.UNSEEN_SUBJECTS))
_OPENING_WORDS = sorted({w for o in reviews.openings() for w in o.split(" ")})


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
