"""marl-exp: multi-adapter RLHF (SFT, reward adapter, PPO) on one base model."""

__version__ = "0.1.0"
