"""``marl-exp`` console script: the same Hydra app as ``python train.py`` (run from the repo root).

``marl-exp compare PATH...`` compares finished runs instead (see ``marl_exp.compare``);
``marl-exp check-model DIR`` runs the PPO invariants on a model (``marl_exp.conformance.cli``); any other
arguments go to the Hydra app.
"""

import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "compare":
        from marl_exp.compare import main as compare

        sys.exit(compare(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "check-model":
        from marl_exp.conformance.cli import main as check_model

        sys.exit(check_model(sys.argv[2:]))

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
