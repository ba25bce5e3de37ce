"""Train one stage of multi-adapter RLHF: `python train.py stage=sft|reward|ppo [overrides]` (= `marl-exp train`).

Thin on purpose: the config is checked before torch and the rest of the heavy stack are imported
(``marl_exp.cli``), so a mistake is reported in a second or two.
"""

from pathlib import Path

from marl_exp.cli import run_app

if __name__ == "__main__":
    run_app(Path(__file__).resolve().parent / "conf")
