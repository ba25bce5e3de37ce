"""marl-exp: multi-adapter RLHF (SFT, reward adapter, PPO) on one base model."""

__version__ = "0.1.0"

# Heavy imports (torch, transformers) load on first use, so `python train.py --help` stays fast.
_LAZY = {
    "AutoModelForCausalLMWithValueHead": "marl_exp.compat",
    "MultiAdapterModel": "marl_exp.modeling.multi_adapter",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'marl_exp' has no attribute {name!r}")


__all__ = list(_LAZY)
