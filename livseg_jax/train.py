"""Train one stage: `python -m livseg_jax.train --config=configs/tumor.py [--workdir=DIR] [--config.x=y]`.

Bad flags, config values and inputs end in one `error:` line (`livseg_jax.cli_errors`; `--debug`
keeps the traceback); the config is validated and the run directory checked before any work.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from livseg_jax.cli_errors import check_output_dir, run_absl_app
from livseg_jax.compilation_cache import use_compilation_cache
from livseg_jax.config_checks import validate_config
from livseg_jax.training.distributed import maybe_initialize_distributed
from livseg_jax.training.loop import cache_root, train_and_evaluate
from livseg_jax.xla_flags import apply_model_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tumor.py", "training config file")
_WORKDIR = flags.DEFINE_string("workdir", "", "run directory (default: runs/<stage>)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config = validate_config(_CONFIG.value)
    workdir = check_output_dir(_WORKDIR.value or os.path.join("runs", config.stage))
    # Before anything starts a backend: the flags the model's forms need, and the user's own.
    apply_model_xla_flags([config.model], config.train.get("xla_flags", ""))
    use_compilation_cache(config.train.get("compilation_cache", "auto"), cache_root(config))
    maybe_initialize_distributed()
    summary = train_and_evaluate(config, workdir)
    best = summary["best_dice"]  # -1 when no validation ran
    dice = f"best validation Dice {best:.4f}" if best >= 0 else "no validation run"
    print(f"done: step {summary['final_step']}, {dice}; run directory {workdir}")


if __name__ == "__main__":
    run_absl_app(main)
