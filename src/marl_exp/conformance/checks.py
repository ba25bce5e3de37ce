"""The invariants a PPO reviewer checks, run against any causal-LM directory (``marl-exp check-model <dir>``).

Each check compares marl-exp's multi-adapter model with an independent reference on this model's own
architecture and tokenizer conventions. The checks that read the reference or the reward (``ROLE_CHECKS``)
run in each sharing mode (``stage.sharing``: one shared base, or separate reference and reward models):

- ``reference_logits``: the reference role (every adapter disabled, with a policy, a critic and a reward
  adapter loaded and active) equals the plain ``AutoModelForCausalLM``, row by row without padding;
- ``reward_position``: the reward PPO reads (its scoring pass, left padding, responses with and without EOS)
  equals ``AutoModelForSequenceClassification`` + ``PeftModel`` on the input RewardTrainer would feed it
  (the text, then EOS, right padding; TRL's pad rule), and so does the reward role alone (``reward_scores``);
- ``kl_zero_ratio_one``: a fresh policy adapter has KL 0 to the reference and ratio 1 in its first update,
  without and with gradient checkpointing (dropout, if the model has any, must stay off);
- ``sampling_parity``: the frequencies of one sampled token at a fixed context match the softmax the
  trainer scores (chi-square test, false-alarm rate ``ALPHA``), whatever the model's generation config;
  responses end at the first of *every* EOS id of the model;
- ``training``: in one step of two policies with critic adapters, every weight meant to train receives a
  non-zero gradient,
  the base, the reward adapter and its score head (and, in separate mode, the reference and reward models)
  are bit-identical, and each policy's KL coefficient and score statistics moved with its own data only.

The reward adapter is a probe made here (peft LoRA for sequence classification with random weights,
saved as RewardTrainer saves one): the checks are about *where* and *how* scores are read, which needs no
trained reward model.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model

from marl_exp.config import (
    AdapterConfig,
    Config,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    PPOStageConfig,
    QuantConfig,
    nest_rl_keys,
)
from marl_exp.data.reviews import ReviewGenerator
from marl_exp.modeling.loading import load_model, load_tokenizer
from marl_exp.modeling.multi_adapter import position_ids_from_mask
from marl_exp.rl.roles import SeparateRoles, critic_name
from marl_exp.rl.rollout import Rollout, sample, score, stop_token_ids, truncate_after_eos
from marl_exp.rl.trainer import RLTrainer

from marl_exp.conformance import CHECKS, ROLE_CHECKS, SHARING_MODES  # noqa: E402 - the CLI reads them without torch
ALPHA = 1e-3  # false-alarm rate of the sampling test
PARITY_SAMPLES = 4000
# Tolerances. A comparison within one batch layout (the role's path and the plain model on the same padded
# batch: the same kernels) is held to the floor TOLERANCE[quant]. A comparison across layouts (a left-padded
# batch against each row alone, or left padding against right) is held to NOISE_FACTOR times the reference's
# own disagreement with itself across the same layouts, on the same inputs, measured in the same run
# (``Probe.across_layouts``), never less than the floor: the same math in another accumulation order, which
# grows with the logits' magnitude and the model's depth (and changes with the thread count). Measured, plain
# model / HF classifier + probe adapter, padded batch vs each row alone (max |logit|, max |score| in brackets):
#   fp32  10 tiny families (2 layers): logits 5.7e-6..1.5e-5 [12-17], scores 2.4e-7..8.6e-6 [0.2-23]
#         SmolLM2-135M (30 layers):    logits 3.6e-5..5.6e-5 [33] (1.2e-4 where the fixed 1e-4 failed it),
#                                      scores 2.6e-6..4.2e-6 [1.8]
#   bf16  tiny llama/qwen2: logits 0 [17], scores 7.8e-3..1.6e-2; SmolLM2: logits 0.50 (4 bf16 steps at 32),
#         scores 2.0e-2
#   8bit  LLM.int8 picks its outlier columns over the whole batch: tiny llama/qwen2 logits 0.20-0.21 (not
#         compared across layouts), scores 1.3e-2..2.3e-2; SmolLM2 scores 0.18
#   4bit  (fp32 compute) tiny llama/qwen2: logits 1.1e-5..1.5e-5, scores 6e-7..2.5e-6; SmolLM2: logits 4.7e-5,
#         scores 1.5e-6
# NOISE_FACTOR: our path crosses the same layouts as the reference's own measurement, in its own order. Measured
# ours / reference noise: at most 1.0 in fp32 and bf16, 0.7 in 8-bit on the tiny families, 1.24 in 8-bit on
# SmolLM2; 2 leaves 1.6x headroom. The bugs these checks exist for move logits and scores by more: an adapter
# left on (8 to 28), a score read one token early (0.93 on SmolLM2 fp32; 0.79 in 8-bit, against a tolerance of
# 0.36), hidden states rounded to bf16 (0.11 on SmolLM2 fp32, against 1e-4).
NOISE_FACTOR = 2
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "8bit": 5e-2, "4bit": 1e-3}  # the floor: within one layout
PROMPT_WORDS = 3


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str
    sharing: str | None = None  # the sharing mode it ran in; None: the check reads no reference or reward role

    def row(self) -> str:
        return f"| {self.name} | {self.sharing or '-'} | {'pass' if self.passed else '**FAIL**'} | {self.detail} |"


def check_model(model_dir: str | Path, quant: str = "fp32", checks: tuple[str, ...] = CHECKS,
                workdir: str | Path | None = None, sharing: tuple[str, ...] = SHARING_MODES) -> list[CheckResult]:
    """Run ``checks`` on the model in ``model_dir`` (a local causal-LM directory), quantized as ``quant``;
    each of ``ROLE_CHECKS`` once per mode in ``sharing``."""
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    unknown = sorted(set(sharing) - set(SHARING_MODES))
    if unknown or not sharing:
        raise ValueError(f"unknown sharing mode(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(SHARING_MODES)}")
    with _workdir(workdir) as work:
        probe = Probe(str(model_dir), quant, work)
        return [getattr(probe, name)(mode) if mode else getattr(probe, name)()
                for name in checks for mode in (sharing if name in ROLE_CHECKS else (None,))]


@contextmanager
def _workdir(path):
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="marl-exp-check-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_texts(n: int = 4, seed: int = 7) -> list[tuple[str, str]]:
    """(prompt, response) pairs from the built-in review grammar: any tokenizer can encode them."""
    generator = ReviewGenerator(seed=seed)
    pairs = []
    for _ in range(n):
        words = generator.review().text.split(" ")
        pairs.append((" ".join(words[:PROMPT_WORDS]), " " + " ".join(words[PROMPT_WORDS:])))
    return pairs


class Probe:
    """One model under test: its tokenizer, a probe reward adapter, and configs for the PPO pieces."""

    def __init__(self, model_dir: str, quant: str, work: Path):
        self.model_dir, self.quant, self.work = model_dir, quant, work
        self.tokenizer = load_tokenizer(model_dir)
        self.cfg = self._config()
        self.device = torch.device("cpu")
        self.reward_dir = self._probe_reward_adapter()
        self.tolerance = TOLERANCE[quant]

    def across_layouts(self, noise: float) -> float:
        """The tolerance of a comparison across batch layouts, from the reference's own ``noise`` across them."""
        return max(self.tolerance, NOISE_FACTOR * noise)

    # --------------------------------------------------------------------------------------- setup
    def _config(self, **stage):
        node = {
            "model": OmegaConf.structured(ModelConfig(name="checked", path=self.model_dir)),
            "quant": OmegaConf.structured(QuantConfig(mode=self.quant)),
            "adapter": OmegaConf.structured(AdapterConfig(r=8, lora_alpha=16)),
            "stage": OmegaConf.merge(OmegaConf.structured(PPOStageConfig), nest_rl_keys({
                "batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8,
                "sft_model": self.model_dir, **stage})),
            "data": OmegaConf.structured(DataConfig), "logger": OmegaConf.structured(LoggerConfig(name="none")),
        }
        return OmegaConf.merge(OmegaConf.structured(Config), node)

    def _probe_reward_adapter(self) -> str:
        """A sequence-classification LoRA with random (non-zero) weights, saved with the tokenizer as
        marl-exp's reward stage saves one (pad token as RewardTrainer sets it: pad, else EOS)."""
        out = self.work / "probe_reward_adapter"
        if (out / "adapter_config.json").exists():
            return str(out)
        classifier = load_model(self.model_dir, self.cfg.model, self.cfg.quant, self.device, task="seq-cls")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            peft_model = get_peft_model(classifier, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               task_type="SEQ_CLS"))
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name or "score" in name:
                        param.normal_(0, 0.05)
        peft_model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return str(out)

    def roles(self, **stage):
        from marl_exp.stages.rl_models import build_roles  # the stage's own construction, as a run does it

        cfg = self._config(**stage)
        return build_roles(cfg, self.model_dir, self.reward_dir, self.device, self.tokenizer), cfg

    def reference_classifier(self):
        classifier = load_model(self.model_dir, self.cfg.model, self.cfg.quant, self.device, task="seq-cls")
        classifier.config.get_text_config().pad_token_id = self.tokenizer.pad_token_id  # TRL: pad, else EOS
        return PeftModel.from_pretrained(classifier, self.reward_dir).eval()

    # -------------------------------------------------------------------------------------- checks
    @torch.no_grad()
    def reference_logits(self, sharing: str) -> CheckResult:
        roles, _ = self.roles(critic="adapter", sharing=sharing)
        model = roles.model
        for adapter in (model.active_policy, critic_name(model.active_policy)):
            perturb(model, adapter)  # adapters that really change the outputs
        texts = [p + r for p, r in probe_texts(3)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        ours = roles.reference_logits(enc.input_ids, enc.attention_mask)
        policy = model.policy_forward(enc.input_ids, enc.attention_mask).logits
        plain = load_model(self.model_dir, self.cfg.model, self.cfg.quant, self.device).eval()
        keep = enc.attention_mask.bool()
        # The same padded batch (positions counted over real tokens, as generate does) ...
        same_batch = plain(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                           position_ids=position_ids_from_mask(enc.attention_mask)).logits.float()
        worst_batch = float((ours.float() - same_batch)[keep].abs().max())
        # ... and each row alone, unpadded, against the plain model's own padded-vs-unpadded noise. Not for
        # 8-bit: LLM.int8 picks its outlier columns over the whole batch, so another batch is another computation.
        worst_rows = noise = 0.0
        for row in range(len(texts) if self.quant != "8bit" else 0):
            expected = plain(input_ids=enc.input_ids[row][keep[row]][None]).logits[0].float()
            worst_rows = max(worst_rows, float((ours[row][keep[row]].float() - expected).abs().max()))
            noise = max(noise, float((same_batch[row][keep[row]] - expected).abs().max()))
        rows_tol = self.across_layouts(noise)
        moved = float((policy - ours).abs().max())
        passed = worst_batch <= self.tolerance and worst_rows <= rows_tol and moved > rows_tol
        rows = (f"; row by row unpadded {worst_rows:.2e} (tol {rows_tol:.1e}: the plain model's own padded vs "
                f"unpadded {noise:.1e})" if self.quant != "8bit" else "")
        return CheckResult("reference_logits", passed,
                           f"max |ref - plain model|: same batch {worst_batch:.2e} (tol {self.tolerance:.0e}){rows}; "
                           f"the perturbed policy differs by {moved:.2e}", sharing)

    @torch.no_grad()
    def reward_position(self, sharing: str) -> CheckResult:
        roles, cfg = self.roles(sharing=sharing)
        tok = self.tokenizer
        pairs = probe_texts(4)
        with_eos = [True, True, False, True]  # the third was cut at max_new_tokens
        query = tok([p for p, _ in pairs], return_tensors="pt", padding=True, padding_side="left")
        rows = [tok(r, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
                for (_, r), eos in zip(pairs, with_eos)]
        width = max(map(len, rows))
        response = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        rollout = score(roles, Rollout(query.input_ids, query.attention_mask, response, mask,
                                       has_eos=torch.tensor(with_eos)), roles.model.active_policy, "value_head",
                        cfg.stage, tok)
        # The reference input: what RewardTrainer feeds (the text, then EOS as text, tokenized), right-padded.
        texts = [p + r + tok.eos_token for p, r in pairs]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="right")
        same_ids = all(
            enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
            == [*query.input_ids[i][query.attention_mask[i].bool()].tolist(), *rows[i][:len(rows[i]) - with_eos[i]],
                tok.eos_token_id]
            for i in range(len(pairs)))
        classifier = self.reference_classifier()
        expected = classifier(**enc).logits[:, 0].float()
        left = tok(texts, return_tensors="pt", padding=True, padding_side="left")
        direct = roles.reward_scores(left.input_ids, left.attention_mask, roles.model.active_policy).float()
        ppo_gap = float((rollout.raw_scores - expected).abs().max())
        direct_gap = float((direct - expected).abs().max())
        # Ours reads a left-padded batch, the reference a right-padded one: across layouts.
        noise = max(abs(float(classifier(input_ids=row[None]).logits[0, 0]) - float(score))
                    for row, score in zip(_rows_alone(enc), expected))
        tolerance = self.across_layouts(noise)
        passed = same_ids and ppo_gap <= tolerance and direct_gap <= tolerance
        return CheckResult("reward_position", passed,
                           f"PPO scoring vs HF classifier+peft on text+EOS: {ppo_gap:.2e}; reward_scores "
                           f"(left padding): {direct_gap:.2e} (tol {tolerance:.1e}: the classifier's own padded vs "
                           f"unpadded {noise:.1e}); pad {'==' if tok.pad_token_id == tok.eos_token_id else '!='} "
                           f"EOS{'' if same_ids else '; TOKENIZATION DIFFERS'}", sharing)

    def kl_zero_ratio_one(self, sharing: str) -> CheckResult:
        details, passed = [], True
        for checkpointing in (False, True):
            roles, cfg = self.roles(gradient_checkpointing=checkpointing, sharing=sharing)
            trainer = RLTrainer(roles, self.tokenizer, cfg.stage, [p for p, _ in probe_texts(4)], seed=0)
            torch.manual_seed(0)
            stats = trainer.step()  # one epoch of one mini-batch: the ratio is read before any update
            kl, ratio, mean = stats["objective/kl"], stats["ppo/policy/ratio_max"], stats["ppo/policy/ratio_mean"]
            ok = abs(kl) <= 1e-6 and abs(ratio - 1) <= 1e-6 and abs(mean - 1) <= 1e-6  # max 1 and mean 1: all 1
            passed &= ok
            details.append(f"{'with' if checkpointing else 'without'} checkpointing: KL {kl:.1e}, max ratio "
                           f"{ratio:.7f}")
        return CheckResult("kl_zero_ratio_one", passed, "; ".join(details), sharing)

    @torch.no_grad()
    def sampling_parity(self) -> CheckResult:
        roles, cfg = self.roles()
        model, tok = roles.model, self.tokenizer
        prompt = probe_texts(1)[0][0]
        stage = cfg.stage.copy()
        stage.sampling.max_new_tokens = 1
        torch.manual_seed(0)
        drawn = sample(model, tok, [prompt] * PARITY_SAMPLES, model.active_policy, stage).response_ids[:, 0]
        enc = tok([prompt], return_tensors="pt")
        probs = (model.policy_forward(enc.input_ids, enc.attention_mask).logits[0, -1].float()
                 / stage.sampling.temperature).softmax(-1)
        statistic, critical, bins = chi_square(drawn, probs)
        parity = statistic <= critical
        detail = f"chi2 {statistic:.1f} vs critical {critical:.1f} ({bins} bins, alpha {ALPHA:g})"
        # The negative control: the model's own generate (its generation_config) if that config changes sampling.
        own = model.peft_model.get_base_model().generation_config
        if _reshapes_sampling(own):
            torch.manual_seed(0)
            with model._role(model.active_policy, eval_mode=True):
                raw = model.peft_model.generate(**tok([prompt] * PARITY_SAMPLES, return_tensors="pt"),
                                                max_new_tokens=1, do_sample=True, pad_token_id=tok.pad_token_id)
            control, _, _ = chi_square(raw[:, -1], probs)
            detail += f"; the model's own generation config would give chi2 {control:.1f} (detected: {control > critical})"
        # Responses end at the first of every EOS id.
        stage.sampling.max_new_tokens = 16
        stops = stop_token_ids(tok, model)
        responses = sample(model, tok, [prompt] * 64, model.active_policy, stage)
        raw = responses.response_ids.clone()
        ids, mask, has_eos = truncate_after_eos(raw, stops, tok.pad_token_id)
        lengths = responses.response_mask.sum(1)
        last = responses.response_ids[torch.arange(len(lengths)), lengths - 1]
        stops_ok = bool(torch.isin(last[responses.has_eos], torch.tensor(stops)).all())
        inside = torch.isin(responses.response_ids, torch.tensor(stops)) & responses.response_mask.bool()
        stops_ok &= bool((inside.sum(1) == responses.has_eos.long()).all())  # one stop id, the last token
        ended_by = {s: int((last[responses.has_eos] == s).sum()) for s in stops}
        detail += f"; stop ids {stops}: responses ended by each {list(ended_by.values())} of 64"
        return CheckResult("sampling_parity", parity and stops_ok, detail)

    def training(self, sharing: str) -> CheckResult:
        # Two epochs: a fresh LoRA's A gets no gradient while its B is 0 (the first update), only in the second.
        # No ratio guard and no clipping: a token whose ratio left the clip range passes no gradient (as PPO
        # means it to), and this check is about where gradients go, not about how far one step may move.
        roles, cfg = self.roles(policies=["calm", "wild"], critic="adapter", whiten_scores=True, ppo_epochs=2,
                                ratio_threshold=1e9, cliprange=1e9, cliprange_value=1e9, target_kl=1.0,
                                kl_horizon=100, sharing=sharing)
        model = roles.model
        perturb(model, "wild", std=0.5)
        # With a critic adapter the policy's own value head is unused: the critic's LoRA and head are trained.
        trainable = {id(p) for name in ("calm", "wild") for n in (name, critic_name(name))
                     for p in model.trainable_parameters(n)} - {id(p) for name in ("calm", "wild")
                                                                 for p in model.value_heads[name].parameters()}
        named = {**dict(model.named_parameters()), **separate_role_parameters(roles)}
        before = {n: p.detach().clone() for n, p in named.items()}
        names = {id(p): n for n, p in named.items()}
        largest_grad = {n: 0.0 for n, p in named.items() if id(p) in trainable}
        clip = torch.nn.utils.clip_grad_norm_

        def watching_clip(params, *args, **kwargs):  # every optimizer step's gradients, just before clipping
            params = list(params)
            for p in params:
                if p.grad is not None and id(p) in trainable:
                    largest_grad[names[id(p)]] = max(largest_grad[names[id(p)]], float(p.grad.abs().max()))
            return clip(params, *args, **kwargs)

        trainer = RLTrainer(roles, self.tokenizer, cfg.stage, [p for p, _ in probe_texts(4)], seed=0)
        torch.manual_seed(0)
        torch.nn.utils.clip_grad_norm_ = watching_clip
        try:
            stats = trainer.step()
        finally:
            torch.nn.utils.clip_grad_norm_ = clip
        unchanged = [n for n, g in largest_grad.items() if g == 0.0]  # never received a non-zero gradient
        touched = [n for n, p in named.items() if id(p) not in trainable and not torch.equal(p, before[n])]
        init = cfg.stage.kl.init_kl_coef
        coefs = stats["wild/objective/kl_coef"], stats["calm/objective/kl_coef"]
        own_kl = coefs[0] > init > coefs[1]  # wild's KL is above the target (β up), calm's 0 (β down)
        counts = [trainer.algorithm.score_moments[n].count for n in ("calm", "wild")]
        passed = not unchanged and not touched and own_kl and counts == [cfg.stage.batch_size] * 2
        detail = (f"{len(trainable)} trained tensors, {len(unchanged)} without gradient{' e.g. ' + unchanged[0] if unchanged else ''}; "
                  f"{len(touched)} frozen tensors changed{' e.g. ' + touched[0] if touched else ''}; KL coef wild "
                  f"{coefs[0]:.5f} / calm {coefs[1]:.5f} (init {init}); score counts {counts}")
        return CheckResult("training", passed, detail, sharing)


def _rows_alone(enc) -> list[torch.Tensor]:
    """Each row of a padded batch without its padding."""
    return [ids[mask.bool()] for ids, mask in zip(enc.input_ids, enc.attention_mask)]


def separate_role_parameters(roles) -> dict[str, torch.nn.Parameter]:
    """The parameters of the reference and reward models that ``sharing=separate`` holds apart (none when shared)."""
    if not isinstance(roles, SeparateRoles):
        return {}
    held = {"reference_model": roles.reference_model, "reward_model": roles.reward_model}
    return {f"{role}.{name}": p for role, model in held.items() if model is not None
            for name, p in model.named_parameters()}


def perturb(model, adapter: str, std: float = 0.05, seed: int = 0) -> None:
    """Non-zero lora_B for ``adapter`` (B starts at 0, so a fresh adapter changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def chi_square(drawn: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, float, int]:
    """Pearson's goodness-of-fit statistic of the tokens ``drawn`` against ``probs``, with the critical value
    at false-alarm rate ``ALPHA``. Tokens expected fewer than ``min_expected`` times share one bin."""
    n = drawn.numel()
    observed = torch.bincount(drawn.cpu(), minlength=probs.numel()).double()
    expected = probs.cpu().double() * n
    big = expected >= min_expected
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < min_expected:  # merge a too-small rest bin into the smallest real one
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmin()] += observed[~big].sum()
        exp[exp.argmin()] += expected[~big].sum()
    statistic = float(((obs - exp) ** 2 / exp).sum())
    return statistic, chi_square_critical(len(exp) - 1, ALPHA), len(exp)


def chi_square_critical(dof: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of chi-square(dof) (Wilson-Hilferty; within ~1% for dof >= 3)."""
    z = _normal_quantile(1 - alpha)
    k = max(dof, 1)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _normal_quantile(p: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):  # bisection on the normal CDF
        mid = (lo + hi) / 2
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _reshapes_sampling(config) -> bool:
    """Does this generation config change the distribution plain sampling would draw from?"""
    def differs(key, neutral):
        value = getattr(config, key, None)
        return value is not None and value != neutral
    return any(differs(k, v) for k, v in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("repetition_penalty", 1.0),
                                          ("no_repeat_ngram_size", 0))) or bool(getattr(config, "bad_words_ids", None))


def format_table(results: list[CheckResult], title: str = "") -> str:
    lines = ([f"{title}", ""] if title else []) + ["| check | sharing | result | measured |", "|---|---|---|---|"]
    return "\n".join(lines + [r.row() for r in results])
