"""Trains the CPU demo models (configs/liver.py, configs/tumor.py) on the built-in synthetic data
and reports the validation Dice and wall time of each stage.

    python -m experiments.train_demo [--stages liver,tumor] [--workdir runs/demo]

Writes experiments/results/train_demo.json. Reruns resume from the run directories, so remove
them for a fresh timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

from experiments.bench_common import REPO, environment, write_result


def load_config(stage: str):
    """Returns configs/<stage>.py's default (demo) config."""
    spec = importlib.util.spec_from_file_location(f"config_{stage}", REPO / "configs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="liver,tumor")
    parser.add_argument("--workdir", default="runs/demo")
    args = parser.parse_args()
    from livseg_jax.training.logging import read_metrics
    from livseg_jax.training.loop import train_and_evaluate

    rows = []
    for stage in args.stages.split(","):
        config = load_config(stage)
        workdir = pathlib.Path(args.workdir) / stage
        start = time.perf_counter()
        summary = train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
        vals = [r for r in read_metrics(workdir) if r["kind"] == "val"]
        rows.append({"stage": stage, "wall_s": wall, "start_step": summary["start_step"],
                     "final_step": summary["final_step"], "best_dice": summary["best_dice"],
                     "validation": [{"step": r["step"], "dice": r["dice"]} for r in vals],
                     "model": config.model.name, "features": list(config.model.features),
                     "patch": list(config.data.patch_size), "workdir": str(workdir)})
        print(f"{stage}: best validation Dice {summary['best_dice']:.3f} in {wall / 60:.1f} min", flush=True)
    path = write_result("train_demo", {"benchmark": "train_demo", "environment": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
