"""``marl-exp`` console script: the same Hydra app as ``python train.py`` (run from the repo root)."""

import sys
from pathlib import Path


def main() -> None:
    import hydra

    from marl_exp.cli import main as run
    from marl_exp.config import register_configs

    conf = Path(__file__).resolve().parents[2] / "conf"
    if not conf.is_dir():
        sys.exit(f"marl-exp: error: config dir {conf} not found; install with `pip install -e .` from a clone")
    register_configs()
    hydra.main(version_base="1.3", config_path=str(conf), config_name="config")(run)()


if __name__ == "__main__":
    main()
