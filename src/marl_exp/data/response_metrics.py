"""What sampled responses say about the policy, from their text alone (no model): the judges' verdicts,
how often it finishes, how varied it writes.

Pure functions of strings, so each number is checked by hand in tests/test_response_metrics.py.
"""

from __future__ import annotations

from typing import Callable, Sequence


def judged_text(prompt, response: str) -> str:
    """The text a task's judges read: a plain prompt and its continuation, or for a conversation (the
    prompt a message list) the assistant turn alone. ``response`` must be the text the tokenizer writes
    after the prompt (``rollout.response_texts``): a SentencePiece response decoded alone lacks its
    leading space."""
    return f"{prompt}{response}" if isinstance(prompt, str) else response


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al. 2016): distinct word n-grams over all responses / all word n-grams.

    Words are whitespace-separated, so the number reads the same under any tokenizer; an n-gram never
    spans two responses. 0.0 when no response has ``n`` words.
    """
    grams = [tuple(words[i:i + n]) for words in (r.split() for r in responses) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_metrics(texts: Sequence[str], responses: Sequence[str], has_eos: Sequence[bool],
                     oracle: Callable[[str], float] | None = None,
                     judge: Callable[[str], bool] | None = None,
                     on_task: Sequence[bool] | None = None) -> dict[str, float]:
    """Means over the samples, for the metrics ``evaluate`` reports beside reward, KL and length.

    ``texts``: prompt + response, as the judges read them; ``responses``: the responses alone;
    ``has_eos``: whether each response ended with EOS (not cut at ``max_new_tokens``).
    Keys: ``eos_fraction``, ``distinct_1``, ``distinct_2``; with an oracle ``oracle_score``; with a judge
    ``well_formed``; with both ``oracle_strict`` (the oracle where the judge accepts, 0 where not). With
    ``on_task`` (the task's verdict on each response, read with its prompt) ``on_task``, and with a judge too
    ``well_formed_on_task`` (the share the judge accepts that are on task).
    """
    if not len(texts) == len(responses) == len(has_eos) or not texts or (on_task is not None
                                                                        and len(on_task) != len(texts)):
        raise ValueError(f"response_metrics needs as many texts ({len(texts)}), responses ({len(responses)}), "
                         f"EOS flags ({len(has_eos)}) and on-task verdicts (where given), at least one")
    count = len(texts)
    metrics = {"eos_fraction": sum(map(bool, has_eos)) / count,
               "distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2)}
    scores = [oracle(t) for t in texts] if oracle is not None else None
    verdicts = [bool(judge(t)) for t in texts] if judge is not None else None
    if scores is not None:
        metrics["oracle_score"] = sum(scores) / count
    if verdicts is not None:
        metrics["well_formed"] = sum(verdicts) / count
    if scores is not None and verdicts is not None:
        metrics["oracle_strict"] = sum(s for s, ok in zip(scores, verdicts) if ok) / count
    if on_task is not None:
        metrics["on_task"] = sum(map(bool, on_task)) / count
        if verdicts is not None:
            metrics["well_formed_on_task"] = sum(ok and bool(t) for ok, t in zip(verdicts, on_task)) / count
    return metrics
