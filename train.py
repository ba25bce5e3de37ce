"""Train one stage of multi-adapter RLHF: `python train.py stage=sft|reward|ppo [overrides]`."""

import hydra
from omegaconf import DictConfig

from marl_exp.cli import main
from marl_exp.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float | None:
    return main(cfg)


if __name__ == "__main__":
    train()
