"""``marl-exp`` console script: the same Hydra app as ``python train.py`` (run from the repo root).

``marl-exp compare PATH...`` compares finished runs (``marl_exp.compare``); ``marl-exp sample RUN_DIR``
samples from a trained policy beside the reference (``marl_exp.sample``); ``marl-exp check-model DIR`` runs
the PPO invariants on a model (``marl_exp.conformance.cli``); ``marl-exp import-gguf FILE OUT_DIR`` writes a
GGUF checkpoint as a plain HF model directory (``marl_exp.modeling.gguf_import``); any other arguments go to
the Hydra app.
"""

import sys
from pathlib import Path


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "compare":
        from marl_exp.compare import main as compare

        sys.exit(compare(sys.argv[2:]))
    if command == "check-model":
        from marl_exp.conformance.cli import main as check_model

        sys.exit(check_model(sys.argv[2:]))
    if command == "sample":
        from marl_exp.sample import main as sample

        sys.exit(sample(sys.argv[2:]))
    if command == "import-gguf":
        from marl_exp.modeling.gguf_import import main as import_gguf

        sys.exit(import_gguf(sys.argv[2:]))

    from marl_exp.cli import run_app
    from marl_exp.config import project_root

    conf = project_root() / "conf"
    if not conf.is_dir():
        sys.exit(f"marl-exp: error: config dir {conf} not found; install with `pip install -e .` from a clone")
    run_app(conf)


if __name__ == "__main__":
    main()
