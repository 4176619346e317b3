"""Run studies at smoke scale on the built-in synthetic data and keep their tables in the repository.

    python -m experiments.smoke_studies losses stages [--workdir /tmp/studies]

Each study runs as `python -m livseg_jax.study --config=configs/studies/NAME.py` would (resuming
in WORKDIR/NAME-smoke); its tables.md / .csv / .json, dice.png, qualitative.png and split.json are then copied to
experiments/results/studies/NAME-smoke/.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

from livseg_jax.study.runner import run_study
from livseg_jax.study.spec import CONFIGS_DIR, load_config_file

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "studies"
KEPT = ("tables.md", "tables.csv", "tables.json", "dice.png", "qualitative.png", "split.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("studies", nargs="+", help="study names (configs/studies/NAME.py)")
    p.add_argument("--workdir", default="/tmp/livseg_studies", help="where the study directories go")
    args = p.parse_args()
    for name in args.studies:
        study = load_config_file(CONFIGS_DIR / "studies" / f"{name}.py", "smoke")
        workdir = pathlib.Path(args.workdir) / f"{name}-smoke"
        run_study(study, workdir)
        dest = RESULTS / f"{name}-smoke"
        dest.mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            shutil.copyfile(workdir / file, dest / file)
        print(f"{name}: {dest / 'tables.md'}")


if __name__ == "__main__":
    main()
