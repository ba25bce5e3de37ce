"""One base causal LM serving every role of RLHF: policies, reference and reward.

* **policy** ``name``: a trainable LoRA adapter plus its own value head;
* **reference**: the same base with every adapter disabled;
* **reward**: a frozen LoRA adapter (trained as a sequence classifier) plus its score head; further
  reward adapters (``add_reward_adapter``), each with its own score head, score other objectives.

Every role switch is one of four, all in the "role switching" section below (their table is there), and
each puts back what it changes: peft's ``set_adapter`` and ``disable_adapter`` both rewrite
``requires_grad`` (peft #2759, #3447), so no forward pass calls them directly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from marl_exp.io import atomic_write_json
from marl_exp.provenance import BASE_RECORD, check_same_base
from marl_exp.modeling.loading import keep_4bit_weights_differentiable

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PolicyOutput:
    logits: torch.Tensor  # [B, T, V], or [B, W, V] for the W positions asked for (``logits_positions``)
    values: torch.Tensor  # [B, T], float32
    hidden_states: torch.Tensor  # [B, T, H], last layer after the final norm


@dataclass
class RoleScores:
    """What scoring a rollout needs from every role, for the same rows and positions."""

    policy_logits: torch.Tensor | None  # [B, W, V] each row under its own policy (None: not asked)
    values: torch.Tensor | None  # [B, W] each row's critic (None with the policy logits)
    reference_logits: torch.Tensor  # [B, W, V] adapters disabled
    reward_scores: torch.Tensor | None  # [B] reward adapter + score head at the last real token (None: not asked)


class ValueHead(nn.Module):
    """Scalar value per token from the last hidden state; kept in float32 whatever the base dtype."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)
        # Small init: the first value estimates are ~0, so early advantages are the rewards themselves.
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden.to(self.summary.weight.dtype))).squeeze(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them (as in generate)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row; correct for left, right and no padding."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def reward_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where a sequence classifier reads its score: HF's rule, the last token whose id is not the pad id.

    This is where the reward model learned its score (RewardTrainer trains through that forward), so
    it must be where it is read. With pad == EOS (GPT-2, Llama, any tokenizer without a pad token) it is
    the token *before* the final EOS, not the EOS itself; without a pad id, the last real token.
    """
    if pad_token_id is None:
        return last_token_index(attention_mask)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id).long()).argmax(-1)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in ``model`` to 0; returns how many were non-zero.

    Eval mode is not enough: gradient checkpointing puts decoder layers back into training mode for
    the recomputation, and some architectures (OPT, Falcon, GPT-2's attention) apply dropout inside
    the layer from a float attribute (``self.dropout``, ``attention_dropout``, ``layerdrop``) gated by
    ``self.training``. PPO's ratio is 1 in the first epoch only if no dropout is ever drawn.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and _is_dropout_name(name) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    configs = [getattr(m, "config", None) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None}.values():  # some layers read the config at run time
        for sub in (config, getattr(config, "get_text_config", lambda: None)()):
            for name, value in (list(vars(sub).items()) if sub is not None else []):
                if isinstance(value, float) and _is_dropout_name(name) and value > 0:
                    setattr(sub, name, 0.0)
    return changed


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or "pdrop" in name or name in ("layerdrop", "drop_path_rate")


class MultiAdapterModel(nn.Module):
    """A ``PeftModel`` with policy adapters + value heads, frozen reward adapter(s) + score head(s)."""

    def __init__(self, peft_model: PeftModel, policy_names: list[str], value_heads: nn.ModuleDict,
                 reward_adapter_name: str | None = None, score_head: nn.Linear | None = None,
                 reward_label_index: int = 0, reward_pad_token_id: int | None = None):
        super().__init__()
        self.peft_model = peft_model
        self.policy_names = list(policy_names)
        self.value_heads = value_heads
        self.reward_adapter_name = reward_adapter_name
        self.score_head = score_head
        self.reward_label_index = reward_label_index
        # The pad id the reward model pooled by when it was trained (see ``reward_token_index``).
        self.reward_pad_token_id = reward_pad_token_id
        # Further reward adapters (``add_reward_adapter``): adapter name -> score head, and (label, pad id).
        self.reward_heads = nn.ModuleDict()
        self._reward_reading: dict[str, tuple[int, int | None]] = {}
        keep_4bit_weights_differentiable(self.peft_model)
        self.activate_policy(self.policy_names[0])

    # ------------------------------------------------------------------------------- construction
    @classmethod
    def build(cls, base: nn.Module, policy_config: LoraConfig | None = None, policy_name: str = "policy",
              policy_adapter: str | None = None, reward_adapter: str | None = None,
              reward_adapter_name: str = "reward", reward_label_index: int | None = None,
              base_path: str | None = None, allow_base_mismatch: bool = False,
              gradient_checkpointing: bool = False, value_head_dropout: float = 0.0,
              reward_pad_token_id: int | None = None) -> "MultiAdapterModel":
        """Wrap a loaded base causal LM (or a ``PeftModel``) with its policy and reward adapters.

        ``policy_adapter`` loads an existing trained policy (adapter dir with a value head); otherwise
        ``policy_config`` creates a fresh one. ``base_path`` (the base's path or hub id) lets the
        same-base guard compare the reward adapter's recorded base with this one.
        ``reward_pad_token_id``: the pad id the reward model was trained with; by default the one of the
        tokenizer saved with the reward adapter (as RewardTrainer set it: pad, else EOS), else the base's.
        """
        if isinstance(base, PeftModel):
            peft_model, policy_names = base, list(base.peft_config)
        else:
            if getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False):
                # Casts norms/embeddings to fp32 for stable training and makes inputs require grad.
                base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
            elif gradient_checkpointing:
                base.gradient_checkpointing_enable()
                base.enable_input_require_grads()
            if policy_adapter is not None:
                peft_model = PeftModel.from_pretrained(base, policy_adapter, adapter_name=policy_name,
                                                       is_trainable=True)
            else:
                peft_model = get_peft_model(base, policy_config or LoraConfig(task_type="CAUSAL_LM"),
                                            adapter_name=policy_name)
            policy_names = [policy_name]
        hidden_size = peft_model.get_base_model().config.get_text_config().hidden_size
        device = peft_model.get_base_model().get_input_embeddings().weight.device
        value_heads = nn.ModuleDict(
            {name: ValueHead(hidden_size, value_head_dropout).to(device) for name in policy_names})
        if policy_adapter is not None and (Path(policy_adapter) / VALUE_HEAD_FILE).exists():
            value_heads[policy_name].load_state_dict(load_file(Path(policy_adapter) / VALUE_HEAD_FILE))

        score_head, label_index = None, 0
        if reward_adapter is not None:
            check_same_base(reward_adapter, base_path, allow_base_mismatch, key="reward_adapter")
            score_head, label_index = _load_reward_adapter(peft_model, reward_adapter, reward_adapter_name,
                                                           reward_label_index, device)
            if reward_pad_token_id is None:
                reward_pad_token_id = reward_adapter_pad_token_id(reward_adapter)
            if reward_pad_token_id is None:
                reward_pad_token_id = peft_model.get_base_model().config.get_text_config().pad_token_id
        return cls(peft_model, policy_names, value_heads,
                   reward_adapter_name if reward_adapter is not None else None, score_head, label_index,
                   reward_pad_token_id)

    def add_policy(self, name: str, config: LoraConfig | None = None, adapter_dir: str | None = None) -> None:
        """Add another trainable policy adapter (fresh from ``config`` or loaded from ``adapter_dir``).

        The active policy stays active; the new adapter and its value head start frozen (they become
        trainable when activated). Every existing parameter keeps its ``requires_grad`` and the new
        modules take the model's current train/eval mode.
        """
        if name in self.peft_model.peft_config or name in self.value_heads:
            raise ValueError(f"adapter name {name!r} is already taken; choose another policy name")
        saved_grad = [(p, p.requires_grad) for p in self.parameters()]
        known_params = {id(p) for p, _ in saved_grad}
        known_modules = {id(m) for m in self.modules()}
        added = False
        try:
            if adapter_dir is not None:
                self.peft_model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=True)
            else:
                # A copy: peft keeps (and mutates) the config object, which may be shared with another policy.
                config = copy.deepcopy(config) if config is not None else LoraConfig(task_type="CAUSAL_LM")
                self.peft_model.add_adapter(name, config)
            added = True
            peft_config = self.peft_model.peft_config[name]
            if getattr(peft_config, "base_model_name_or_path", None) is None:  # get_peft_model sets it, add_adapter not
                peft_config.base_model_name_or_path = self.config.name_or_path
            hidden_size = self.config.get_text_config().hidden_size
            head = ValueHead(hidden_size, self._value_head_dropout()).to(self.device)
            if adapter_dir is not None and (Path(adapter_dir) / VALUE_HEAD_FILE).exists():
                head.load_state_dict(load_file(Path(adapter_dir) / VALUE_HEAD_FILE))
            self.value_heads[name] = head
            self.policy_names.append(name)
        except BaseException:
            if added and name not in self.policy_names:
                self.peft_model.delete_adapter(name)
            raise
        finally:
            # peft's load_adapter/add_adapter/set_adapter rewrite requires_grad: put every flag back.
            self.peft_model.set_adapter(self._active_policy)
            for param, flag in saved_grad:
                param.requires_grad = flag
            for param in self.parameters():
                if id(param) not in known_params:
                    param.requires_grad = False  # only the active policy trains
            for module in self.modules():
                if id(module) not in known_modules:
                    module.training = self.training

    def add_reward_adapter(self, name: str, source: str, label_index: int | None = None,
                           pad_token_id: int | None = None, base_path: str | None = None,
                           allow_base_mismatch: bool = False) -> None:
        """Load another frozen reward adapter (LoRA + its own score head) onto the base, as ``name``.

        Scored with ``compute_reward_score(..., reward_adapter_name=name)``; the first reward adapter
        (``reward_adapter_name``) stays the one ``score_roles`` scores in its fused pass. Every existing
        parameter keeps its ``requires_grad``; the new weights are frozen. ``label_index`` and
        ``pad_token_id`` as for ``build``'s reward adapter.
        """
        if name in self.peft_model.peft_config or name in self.value_heads or name in self.reward_heads:
            raise ValueError(f"adapter name {name!r} is already taken; choose another reward adapter name")
        check_same_base(source, base_path, allow_base_mismatch, key="reward_adapter")
        saved_grad = [(p, p.requires_grad) for p in self.parameters()]
        known = {id(p) for p, _ in saved_grad}
        # peft initialises the new LoRA weights at random before loading them: draw nothing from the run's stream.
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                head, label = _load_reward_adapter(self.peft_model, source, name, label_index, self.device)
        finally:  # peft's add_adapter may rewrite requires_grad: put every flag back, the new weights frozen
            self.peft_model.set_adapter(self._active_policy)
            for param, flag in saved_grad:
                param.requires_grad = flag
            for param in self.parameters():
                if id(param) not in known:
                    param.requires_grad = False
        if pad_token_id is None:
            pad_token_id = reward_adapter_pad_token_id(source)
        if pad_token_id is None:
            pad_token_id = self.config.get_text_config().pad_token_id
        head.train(self.training)
        self.reward_heads[name] = head
        self._reward_reading[name] = (label, pad_token_id)

    @property
    def reward_adapter_names(self) -> list[str]:
        """Every reward adapter on the base, the fused pass's first."""
        return ([self.reward_adapter_name] if self.score_head is not None else []) + list(self.reward_heads)

    def _reward_role(self, name: str | None) -> tuple[str, nn.Linear, int, int | None]:
        """(adapter, score head, label index, pad id) of reward adapter ``name`` (None = the first one)."""
        if name is None or name == self.reward_adapter_name:
            if self.score_head is None:
                raise ValueError("this model has no reward adapter; load one with reward_adapter=<dir or hub id>")
            return self.reward_adapter_name, self.score_head, self.reward_label_index, self.reward_pad_token_id
        if name not in self.reward_heads:
            raise ValueError(f"unknown reward adapter {name!r}; known: {', '.join(self.reward_adapter_names) or 'none'}")
        return (name, self.reward_heads[name], *self._reward_reading[name])

    # ---------------------------------------------------------------------------------- properties
    @property
    def config(self):
        return self.peft_model.get_base_model().config

    @property
    def generation_config(self) -> GenerationConfig:
        """The base model's (its EOS ids say where responses end; its sampling settings are not used)."""
        return self.peft_model.get_base_model().generation_config

    @property
    def device(self) -> torch.device:
        return self.peft_model.get_base_model().get_input_embeddings().weight.device

    @property
    def active_policy(self) -> str:
        return self._active_policy

    def _value_head_dropout(self) -> float:
        return next(iter(self.value_heads.values())).dropout.p if len(self.value_heads) else 0.0

    # ------------------------------------------------------------------------------ role switching
    # Every role switch of the model, on this screen:
    #   activate_policy(name)  train a policy: ``name`` active and the only trainable adapter (with its value
    #                          head); stays active. policy_forward, compute_reward_score(ppo_adapter_name=)
    #   _role(adapter)         generate: any adapter, or None = the reference; eval mode; the active adapter,
    #                          requires_grad and modes restored on exit. generate
    #   _scoring_pass(adapter) score without gradients: only the LoRA layers' selection flips (None = all
    #                          disabled), restored on exit. reference_logits, compute_reward_score
    #   _rows_under(adapters)  fused scoring: row i under adapters[i] by peft's per-row hooks; nothing is
    #                          switched. score_roles
    def activate_policy(self, name: str) -> None:
        """Make ``name`` the active (and only trainable) policy adapter with its value head."""
        self._check_policy(name)
        self.peft_model.set_adapter(name)
        self._active_policy = name
        self._apply_trainable(name)

    def _check_policy(self, name: str) -> None:
        """``name`` is a policy: one of ours, or an adapter added to the peft model with peft's own API
        (``add_adapter`` / ``load_adapter``, as TRL's multi-adapter docs did), adopted here with a value head."""
        if name in self.policy_names:
            return
        if name in self.peft_model.peft_config and name not in self._reward_names():
            head = ValueHead(self.config.get_text_config().hidden_size, self._value_head_dropout()).to(self.device)
            head.requires_grad_(False)
            head.train(self.training)
            self.value_heads[name] = head
            self.policy_names.append(name)
            return
        known = [n for n in self.peft_model.peft_config if n not in self._reward_names()]
        raise ValueError(f"unknown policy adapter {name!r}; known: {', '.join(known)}")

    def _apply_trainable(self, active: str) -> None:
        # Gradients flow only into the active policy's LoRA weights and value head; never the
        # base, the other policies or the reward adapter.
        for param_name, param in self.peft_model.named_parameters():
            param.requires_grad = _adapter_of(param_name) == active
        for name, head in self.value_heads.items():
            head.requires_grad_(name == active)
        if self.score_head is not None:
            self.score_head.requires_grad_(False)
        self.reward_heads.requires_grad_(False)

    def _reward_names(self) -> set[str]:
        """Adapter names that are reward adapters (never policies), loaded or reserved."""
        return {self.reward_adapter_name, *self.reward_heads}

    @contextlib.contextmanager
    def _role(self, adapter: str | None, eval_mode: bool = False):
        """Run with ``adapter`` active (None = all adapters disabled); restore everything on exit."""
        saved_active = self._active_policy
        switch = adapter != saved_active  # the active policy needs no switch: nothing to save or restore
        saved_grad = [(p, p.requires_grad) for p in self.parameters()] if switch else []
        try:
            with self._eval_mode(eval_mode):
                if adapter is None:
                    # The tuner's own toggle: PeftModel.disable_adapter first inspects every layer's status
                    # (get_model_status, ~25 ms per call on a 134M model).
                    self.peft_model.base_model.disable_adapter_layers()
                elif switch:
                    self.peft_model.set_adapter(adapter)
                yield
        finally:
            if adapter is None:
                self.peft_model.base_model.enable_adapter_layers()
            if switch:
                self.peft_model.set_adapter(saved_active)
                self._active_policy = saved_active
                for param, flag in saved_grad:
                    param.requires_grad = flag

    @contextlib.contextmanager
    def _eval_mode(self, enabled: bool = True):
        """Eval mode inside, every module's own mode restored on exit (only those in training mode change)."""
        training = [m for m in self._structure()[0] if m.training] if enabled else []
        try:
            for module in training:
                module.training = False
            yield
        finally:
            for module in training:
                module.training = True

    @contextlib.contextmanager
    def _scoring_pass(self, adapter: str | None):
        """A no-grad pass in eval mode under ``adapter`` (None = the base alone), for reference and reward.

        Only the LoRA layers' adapter selection changes (``_active_adapter`` / ``_disable_adapters``),
        and it is put back on exit: peft's ``set_adapter`` and adapter disabling would also rewrite
        ``requires_grad`` on every LoRA weight, which then must be saved and restored on every call.
        The forward is peft's ordinary one, so results are those of ``set_adapter``/``disable_adapter``.
        """
        layers = self._structure()[1]
        saved = [(layer, layer._active_adapter, layer._disable_adapters) for layer in layers]
        try:
            with self._eval_mode():
                for layer in layers:
                    if adapter is None:
                        layer._disable_adapters = True
                    else:
                        layer._active_adapter = [adapter]
                yield
        finally:
            for layer, active, disabled in saved:
                layer._active_adapter, layer._disable_adapters = active, disabled

    def _structure(self) -> tuple[list[nn.Module], list[BaseTunerLayer]]:
        """All modules and the LoRA layers, cached: they change only when adapters are added or removed."""
        key = (tuple(self.peft_model.peft_config), tuple(self.value_heads))
        if getattr(self, "_structure_cache", (None,))[0] != key:
            modules = list(self.modules())
            self._structure_cache = (key, modules, [m for m in modules if isinstance(m, BaseTunerLayer)])
        return self._structure_cache[1], self._structure_cache[2]

    @contextlib.contextmanager
    def _rows_under(self, adapters: list[str | None]):
        """An eval-mode pass with row ``i`` under ``adapters[i]`` (None = base), for scoring without gradients.

        peft's per-row adapter hooks (``adapter_names``; ``__base__`` = no adapter) pick the adapters, so
        nothing is switched and every flag stays as it is.
        """
        names = ["__base__" if a is None else a for a in adapters]
        with self._eval_mode(), self.peft_model.base_model._enable_peft_forward_hooks(adapter_names=names):
            yield

    # -------------------------------------------------------------------------------- forward passes
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden state from the backbone alone (no LM head): the reward and value heads need only this."""
        causal_lm = self.peft_model.get_base_model()
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        with self._checkpointing_active():
            out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def _lm_logits(self, hidden: torch.Tensor, positions: slice | None = None) -> torch.Tensor:
        return causal_lm_logits(self.peft_model.get_base_model(), hidden, positions)

    @contextlib.contextmanager
    def _checkpointing_active(self):
        """Gradient checkpointing that works in eval mode too.

        transformers checkpoints a layer only when it is in training mode, but PPO runs the policy in
        eval mode (dropout off). With gradients on, the decoder layers alone are switched to training
        mode for the call; their submodules (attention dropout) keep their own mode.
        """
        layers = [] if not torch.is_grad_enabled() else [
            m for m in self.peft_model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        if not layers:
            yield
            return
        saved = [(layer, layer.training) for layer in layers]
        try:
            for layer in layers:
                layer.training = True
            yield
        finally:
            for layer, training in saved:
                layer.training = training

    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       adapter: str | None = None, logits_positions: slice | None = None) -> PolicyOutput:
        """Logits and values of policy ``adapter`` (default: the active one), with gradients.

        ``logits_positions`` computes the logits at those positions only (values stay [B, T]).
        Naming another policy is a deliberate switch: it becomes the active policy (as with
        ``activate_policy``) and stays active afterwards, because only the active policy's LoRA
        weights and value head have ``requires_grad``. Train/eval modes are left untouched.
        """
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        adapter = adapter or self._active_policy
        if adapter != self._active_policy:
            self.activate_policy(adapter)
        hidden = self._hidden_states(input_ids, attention_mask)
        return PolicyOutput(self._lm_logits(hidden, logits_positions), self.value_heads[adapter](hidden), hidden)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> PolicyOutput:
        return self.policy_forward(input_ids, attention_mask)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         logits_positions: slice | None = None) -> torch.Tensor:
        """Logits of the base model alone (every adapter disabled): the KL reference."""
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self._scoring_pass(None):
            return self._lm_logits(self._hidden_states(input_ids, attention_mask), logits_positions)

    @torch.no_grad()
    def score_roles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, policies: list[str],
                    critics: list[str] | None = None, logits_positions: slice | None = None,
                    reward_input_ids: torch.Tensor | None = None,
                    reward_attention_mask: torch.Tensor | None = None, reward: bool = True) -> RoleScores:
        """Every role's view of the same rows in ONE forward (peft's mixed-adapter batch).

        Row ``i`` is run under ``policies[i]`` (logits), under ``critics[i]`` (its value head; default:
        the policy's own), with every adapter disabled (reference logits) and under the reward adapter
        (score where its classifier reads it). The rows are stacked into one batch with an adapter name per
        row, so one pass replaces three or four and no adapter is switched. Equal to the separate calls
        (``policy_forward``, ``reference_logits``, ``compute_reward_score``) up to float rounding of the
        larger matmuls; with 8-bit (LLM.int8) weights the outlier split depends on the whole batch, so
        there the two differ by about as much as two batch compositions do. ``reward=False`` leaves the
        reward rows out (``reward_scores`` is None): a run whose reward comes from other sources.
        """
        if reward and self.score_head is None:
            raise ValueError("this model has no reward adapter; load one with reward_adapter=<dir or hub id>")
        critics = list(policies) if critics is None else list(critics)
        unknown = sorted((set(policies) | set(critics)) - set(self.policy_names))
        if unknown:
            raise ValueError(f"unknown policy adapter(s) {', '.join(unknown)}; known: {', '.join(self.policy_names)}")
        rows = len(policies)
        own_critic = [i for i in range(rows) if critics[i] == policies[i]]
        extra = [i for i in range(rows) if critics[i] != policies[i]]  # rows run again under a critic adapter
        blocks = [list(range(rows)), extra, list(range(rows))]  # policy, critic, reference; then the reward rows
        names = list(policies) + [critics[i] for i in extra] + [None] * rows
        index = torch.tensor([i for block in blocks for i in block], device=input_ids.device)
        ids, mask = [input_ids[index]], [attention_mask[index]]
        if reward:
            reward_ids = input_ids if reward_input_ids is None else reward_input_ids
            reward_mask = attention_mask if reward_attention_mask is None else reward_attention_mask
            extra_columns = reward_ids.shape[1] - input_ids.shape[1]  # the reward rows may be wider (appended EOS)
            ids = [nn.functional.pad(ids[0], (0, extra_columns)), reward_ids]
            mask = [nn.functional.pad(mask[0], (0, extra_columns)), reward_mask]
            names += [self.reward_adapter_name] * rows
        with self._rows_under(names):
            hidden = self._hidden_states(torch.cat(ids), torch.cat(mask))
        policy_h, critic_h, ref_h = hidden[:len(index), :input_ids.shape[1]].split([rows, len(extra), rows])
        reward_h = hidden[len(index):]

        values = torch.empty(policy_h.shape[:2], dtype=torch.float32, device=hidden.device)
        for name in set(critics):
            own = [i for i in own_critic if critics[i] == name]
            if own:
                values[own] = self.value_heads[name](policy_h[own]).float()
            other = [k for k, i in enumerate(extra) if critics[i] == name]
            if other:
                values[[extra[k] for k in other]] = self.value_heads[name](critic_h[other]).float()
        scores = None
        if reward:
            last = reward_h[torch.arange(rows, device=hidden.device),
                            reward_token_index(reward_ids, reward_mask, self.reward_pad_token_id)]
            scores = self.score_head(last.to(self.score_head.weight.dtype))[:, self.reward_label_index]
        positions = slice(None) if logits_positions is None else logits_positions
        # The output layer may carry LoRA too (adapter.output_layer): each row's logits under its own adapter.
        with self._rows_under(list(policies)):
            policy_logits = self._lm_logits(policy_h, positions)
        with self._rows_under([None] * rows):
            reference_logits = self._lm_logits(ref_h, positions)
        return RoleScores(policy_logits=policy_logits, values=values[:, positions],
                          reference_logits=reference_logits, reward_scores=scores)

    @torch.no_grad()
    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             ppo_adapter_name: str | None = None, return_all_tokens: bool = False,
                             reward_label_index: int | None = None, reward_adapter_name: str | None = None,
                             **_) -> torch.Tensor:
        """Reward of each sequence [B], read where HF's sequence classifier reads it (``reward_token_index``:
        the last token that is not padding, left or right padding), so it equals the reward model's score.

        The input is taken as given: PPO passes what the reward trainer saw (the text, then EOS).
        ``return_all_tokens=True`` gives the score at every position [B, T] instead.
        ``ppo_adapter_name`` names the policy adapter to leave active afterwards (default: the one
        active before the call). Naming another policy switches to it as ``activate_policy`` does;
        naming the active one (or none) leaves every flag and mode exactly as it was.
        ``reward_adapter_name``: which reward adapter scores (default: the first, ``self.reward_adapter_name``;
        others are loaded with ``add_reward_adapter``), read with its own score head, label and pad id.
        """
        adapter, head, own_label, pad_token_id = self._reward_role(reward_adapter_name)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        label = own_label if reward_label_index is None else reward_label_index
        check_label_index(label, head.out_features)
        if ppo_adapter_name is not None:
            self._check_policy(ppo_adapter_name)
        with self._scoring_pass(adapter):
            hidden = self._hidden_states(input_ids, attention_mask)
            scores = head(hidden.to(head.weight.dtype))[..., label]
        if ppo_adapter_name is not None and ppo_adapter_name != self._active_policy:
            self.activate_policy(ppo_adapter_name)
        if return_all_tokens:
            return scores
        index = reward_token_index(input_ids, attention_mask, pad_token_id)
        return scores[torch.arange(scores.shape[0], device=scores.device), index]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, adapter: str | None = None,
                 prompt_group: int = 1, **generate_kwargs) -> torch.Tensor:
        """Sample from policy ``adapter`` (default: the active one) with the model's KV cache.

        Runs in eval mode with ``adapter`` active, then restores the active policy, every
        ``requires_grad`` and every train/eval mode. Position ids under left padding are generate's
        own (``cumsum(attention_mask) - 1``), the same as ``position_ids_from_mask`` gives every forward.
        ``prompt_group``: rows come in runs of this many identical prompts (GRPO's ``num_generations``);
        each run's prompt is computed once (``shared_prefill``). Rows that do not are generated as usual.
        """
        from marl_exp.modeling.shared_prefill import shared_prompt_cache

        adapter = adapter or self._active_policy
        self._check_policy(adapter)
        with self._role(adapter, eval_mode=True), self._only_given_generation_config():
            cache = shared_prompt_cache(self.peft_model, input_ids, attention_mask, prompt_group)
            return self.peft_model.generate(input_ids=input_ids, attention_mask=attention_mask, **cache,
                                            **generate_kwargs)

    @contextlib.contextmanager
    def _only_given_generation_config(self):
        """Generate with exactly the settings passed, not the model's ``generation_config``.

        transformers fills every setting a call leaves unset from ``model.generation_config``: a hub
        model's ``repetition_penalty``, ``no_repeat_ngram_size``, ``temperature``, ``top_p`` or
        ``bad_words_ids`` would silently reshape the distribution PPO samples from, while its log-probs
        are scored under the plain softmax. A blank config leaves only transformers' neutral defaults.
        """
        base = self.peft_model.get_base_model()
        saved = base.generation_config
        base.generation_config = GenerationConfig()
        try:
            yield
        finally:
            base.generation_config = saved

    # ---------------------------------------------------------------------------------- inspection
    def trainable_parameters(self, adapter: str | None = None) -> list[nn.Parameter]:
        """The LoRA weights and value head of policy ``adapter`` (default: the active one)."""
        adapter = adapter or self._active_policy
        params = [p for n, p in self.peft_model.named_parameters() if _adapter_of(n) == adapter]
        return params + list(self.value_heads[adapter].parameters())

    def memory_footprint(self) -> dict[str, int]:
        """Bytes held by base weights, adapters (all LoRA weights) and heads (value + score)."""
        sizes = {"base_weights": 0, "adapters": 0, "heads": 0}
        seen: set[int] = set()
        seen_storage: set[tuple[int, int]] = set()
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            nbytes = tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor, seen_storage)
            if name.startswith(("value_heads.", "score_head.", "reward_heads.")):
                sizes["heads"] += nbytes
            elif _adapter_of(name) is not None:
                sizes["adapters"] += nbytes
            else:
                sizes["base_weights"] += nbytes
        sizes["total"] = sum(sizes.values())
        return sizes

    # --------------------------------------------------------------------------------------- saving
    def save_policy(self, directory: str | Path, adapter: str | None = None, base_record: dict | None = None,
                    value_head: bool = True) -> Path:
        """Save policy ``adapter`` so that plain peft loads it: adapter files at the top of ``directory``
        (not in a per-adapter subfolder), plus ``value_head.safetensors`` when ``value_head`` (a stage
        without a critic trains none, and saves none)."""
        adapter = adapter or self._active_policy
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # The base's embedding and output layers are frozen: with LoRA on the output layer (adapter.output_layer)
        # peft would otherwise save whole copies of them beside the adapter.
        state = get_peft_model_state_dict(self.peft_model, adapter_name=adapter, save_embedding_layers=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / "adapter_model.safetensors")
        self.peft_model.peft_config[adapter].save_pretrained(directory)
        if value_head:
            head_state = {k: v.detach().contiguous().cpu() for k, v in self.value_heads[adapter].state_dict().items()}
            save_file(head_state, directory / VALUE_HEAD_FILE)
        if base_record is not None:
            atomic_write_json(directory / BASE_RECORD, base_record)
        return directory


def _adapter_of(param_name: str) -> str | None:
    """Adapter name of a LoRA parameter (``...lora_A.<name>.weight``), None for anything else."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def _quant_state_bytes(tensor: torch.Tensor, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of the quantization statistics bitsandbytes keeps beside a weight (not parameters or buffers):
    8-bit ``SCB`` (per-row scales; ``CB`` when it is not the weight itself), 4-bit ``quant_state``
    (absmax, code, offset and the nested state's absmax and code). Shared tensors count once."""
    seen = set() if seen is None else seen
    seen.add((tensor.data_ptr(), tensor.numel()))
    side = [getattr(tensor, "SCB", None), getattr(tensor, "CB", None)]
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        side += [getattr(state, "absmax", None), getattr(state, "code", None), getattr(state, "offset", None)]
        state = getattr(state, "state2", None)
    total = 0
    for extra in side:
        if not isinstance(extra, torch.Tensor):
            continue
        key = (extra.data_ptr(), extra.numel())
        if key in seen:
            continue
        seen.add(key)
        total += extra.numel() * extra.element_size()
    return total


# ------------------------------------------------------------------------------------ reward adapter
def _load_reward_adapter(peft_model: PeftModel, source: str, name: str, label_index: int | None,
                         device: torch.device) -> tuple[nn.Linear, int]:
    """Load a reward adapter (LoRA weights + score head) frozen onto the causal-LM ``peft_model``.

    Adapters from TRL's RewardTrainer are sequence-classification adapters: their score head is
    stored with the LoRA weights (as ``...score.weight`` and maybe ``...score.bias``). peft would
    drop it silently on a causal LM, so the head is read here into its own frozen layer.
    """
    config = PeftConfig.from_pretrained(source)
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, True
    weights = load_peft_weights(source, device="cpu")  # safetensors or the old adapter_model.bin
    score = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.endswith(("score.weight", "score.bias"))}
    if "weight" not in score:
        raise ValueError(f"reward adapter {source!r} has no score head (no key ending in 'score.weight'); "
                         "train it with stage=reward or TRL's RewardTrainer")
    lora_weights = {k: v for k, v in weights.items() if "score." not in k}
    num_labels, hidden = score["weight"].shape
    label_index = check_label_index(0 if label_index is None else label_index, num_labels)
    model_hidden = peft_model.get_base_model().config.get_text_config().hidden_size
    if hidden != model_hidden:
        raise ValueError(f"reward adapter {source!r} has a score head for hidden size {hidden}, but the base has "
                         f"hidden size {model_hidden}; was it trained on another base?")
    if name in peft_model.peft_config:
        raise ValueError(f"adapter name {name!r} is already taken; choose another reward_adapter_name")
    peft_model.add_adapter(name, config)
    try:
        result = set_peft_model_state_dict(peft_model, lora_weights, adapter_name=name)
        missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"reward adapter {source!r} does not fit this base: {len(missing)} missing, "
                             f"{len(result.unexpected_keys)} unexpected LoRA weights; was it trained on another "
                             "architecture?")
    except Exception:
        peft_model.delete_adapter(name)
        raise

    head = nn.Linear(hidden, num_labels, bias="bias" in score)
    head.load_state_dict({k: v.float() for k, v in score.items()})
    head.requires_grad_(False)
    return head.to(device), label_index


def check_label_index(label_index: int, num_labels: int) -> int:
    if not 0 <= label_index < num_labels:
        raise ValueError(f"reward_label_index={label_index} is out of range for a score head with {num_labels} "
                         f"label{'s' if num_labels != 1 else ''} (valid: 0..{num_labels - 1})")
    return label_index


def reward_head_labels(source: str) -> int:
    """Number of outputs of a reward adapter's score head (2 for a two-label adapter such as TRL's hh one)."""
    weights = load_peft_weights(source, device="cpu")
    heads = [v for k, v in weights.items() if k.endswith("score.weight")]
    if not heads:
        raise ValueError(f"reward adapter {source!r} has no score head (no key ending in 'score.weight'); "
                         "train it with stage=reward or TRL's RewardTrainer")
    return heads[0].shape[0]


def reward_adapter_pad_token_id(source: str) -> int | None:
    """The pad id a reward adapter was trained with, from the tokenizer saved beside it (marl-exp's reward
    stage saves one): RewardTrainer pads with the tokenizer's pad token, else its EOS. None without one."""
    if not (Path(source) / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def causal_lm_logits(causal_lm: nn.Module, hidden: torch.Tensor, positions: slice | None = None) -> torch.Tensor:
    """Last hidden states -> the logits ``causal_lm``'s own forward returns, at ``positions`` only (every
    role's logits come from here, whichever model holds the role)."""
    # Only the positions asked for: the LM head and everything after it scale with the vocabulary.
    if positions is not None:
        hidden = hidden[:, positions].contiguous()  # a strided slice would make the matmul batched and slower
    return output_logits(causal_lm, causal_lm.get_output_embeddings()(hidden))


def output_logits(causal_lm: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """What the model's own forward does to the LM head's output: Gemma 2/3 cap the logits
    (``final_logit_softcapping``), Cohere scales them (``logit_scale``), Granite divides
    (``logits_scaling``). Calling the head alone must give the logits ``model(...)`` gives."""
    config = causal_lm.config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    return logits
