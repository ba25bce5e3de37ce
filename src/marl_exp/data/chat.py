"""Conversations: TRL's conversational formats, the chat template, and the token ids every role sees.

A row is conversational when its text fields are message lists (``[{"role": "user", "content": ...}]``),
TRL's rule (``trl.data_utils.is_conversational``). TRL's SFTTrainer and RewardTrainer render them with
the tokenizer's chat template; PPO must feed its roles the same tokens:

- the policy samples after ``apply_chat_template(prompt, add_generation_prompt=True)`` and stops at the
  template's end-of-turn token (``end_of_turn_ids``);
- the reward model reads ``apply_chat_template(prompt + [assistant: response])``, exactly RewardTrainer's
  input (``reward_sequences``), not the plain-text rule of an appended EOS.

The template is the tokenizer's own, or ``data.chat_template`` (a name in ``conf/chat_templates/`` or a
``.jinja`` file) for base models without one.
"""

from __future__ import annotations

import logging
import re
from trl.data_utils import is_conversational as trl_is_conversational

from marl_exp.config.chat_templates import resolve_template, template_names
from marl_exp.errors import ConfigError

log = logging.getLogger(__name__)
# Special tokens a template writes literally (``<|im_start|>``, ``<|eot_id|>``): added to a vocabulary
# that lacks them, so each stays one token the policy can learn to emit.
_TEMPLATE_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def is_conversational(value) -> bool:
    """A message list (TRL's conversational format) rather than a plain string."""
    return trl_is_conversational({"prompt": value}) if isinstance(value, list) and value else False


def apply_template(tokenizer, data_cfg, conversational: bool) -> None:
    """Set ``data.chat_template`` on the tokenizer (it overrides the tokenizer's own); a conversational
    task with neither fails here, before any training."""
    spec = getattr(data_cfg, "chat_template", None)
    if spec:
        tokenizer.chat_template = resolve_template(spec)
    elif conversational and not tokenizer.chat_template:
        raise ConfigError(f"data={data_cfg.name} is conversational but the tokenizer has no chat template; set "
                          f"data.chat_template=<.jinja file or one of: {', '.join(template_names())}>")


def missing_template_tokens(tokenizer) -> list[str]:
    return [t for t in dict.fromkeys(_TEMPLATE_TOKEN.findall(tokenizer.chat_template or ""))
            if t not in tokenizer.get_vocab()]


def add_template_tokens(model, tokenizer) -> list[str]:
    """Add the special tokens the chat template writes but the vocabulary lacks, and grow the model's
    embeddings to match (what TRL's ``clone_chat_template`` does for a template from another tokenizer).
    The new rows start at the mean embedding (transformers' default) and must be trained: full SFT does."""
    missing = missing_template_tokens(tokenizer)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tokenizer))
        log.info("added the chat template's tokens %s to the vocabulary", missing)
    return missing


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the template writes right after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``): where a policy's reply ends. Empty when it writes none."""
    prompt = [{"role": "user", "content": "hi"}]
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    whole = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "ok"}], tokenize=True,
                                          return_dict=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    tail = whole[len(head):]
    return next(([i] for i in tail if i in special), [])


def stop_at_end_of_turn(generation_config, tokenizer) -> list[int]:
    """Add the template's end-of-turn token to ``generation_config.eos_token_id`` (as instruct models ship
    it: Llama 3's ``[<|end_of_text|>, <|eot_id|>]``), where every sampler of marl-exp looks for stop ids."""
    found = generation_config.eos_token_id
    found = list(found) if isinstance(found, (list, tuple)) else [found]
    ids = list(dict.fromkeys(i for i in [tokenizer.eos_token_id, *found, *end_of_turn_ids(tokenizer)] if i is not None))
    generation_config.eos_token_id = ids
    return ids


def encode_prompts(tokenizer, prompts: list) -> dict:
    """Token ids of PPO prompts: message lists through the template with the generation prompt (as TRL's
    GRPO/RLOO trainers do), plain strings through the tokenizer; left-padded."""
    if is_conversational(prompts[0]):
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for p in prompts]
        return tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    return tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")


def prompt_text(tokenizer, prompt) -> str:
    """A prompt as the policy reads it (for logs and length checks)."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return prompt


def prompt_length(tokenizer, prompt) -> int:
    if is_conversational(prompt):
        return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    return len(tokenizer(prompt).input_ids)


def reward_sequences(tokenizer, prompts: list[list[dict]], responses: list[str]) -> list[list[int]]:
    """What RewardTrainer tokenized for a conversational pair side: ``prompt + [assistant: response]``
    rendered by the chat template (``trl.data_utils._tokenize``: ``apply_chat_template(tokenize=True)``),
    ending in the template's end-of-turn tokens and with no EOS appended."""
    return [tokenizer.apply_chat_template(list(p) + [{"role": "assistant", "content": r}], tokenize=True,
                                          return_dict=True)["input_ids"]
            for p, r in zip(prompts, responses)]
