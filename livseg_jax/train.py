"""Train one stage: `python -m livseg_jax.train --config=configs/tumor.py [--workdir=DIR] [--config.x=y]`.

Bad flags, config values and inputs end in one `error:` line (`livseg_jax.cli_errors`; `--debug`
keeps the traceback); the config is validated and the run directory checked before any work.
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from livseg_jax.atomic_write import exit_on_sigterm
from livseg_jax.cli_errors import check_output_dir, run_absl_app
from livseg_jax.compilation_cache import OFF, use_compilation_cache
from livseg_jax.config_checks import validate_config
from livseg_jax.training.distributed import maybe_initialize_distributed, process_label
from livseg_jax.training.loop import cache_root, train_and_evaluate
from livseg_jax.xla_flags import apply_training_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tumor.py", "training config file")
_WORKDIR = flags.DEFINE_string("workdir", "", "run directory (default: runs/<stage>)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    exit_on_sigterm()  # SIGTERM unwinds like Ctrl-C: no temporary files left (atomic_write)
    config = validate_config(_CONFIG.value)
    workdir = check_output_dir(_WORKDIR.value or os.path.join("runs", config.stage))
    # Before anything starts a backend: the flags the model's forms need, the user's own, and the
    # autotuning results to load (the user's flags win over both).
    autotune_line = apply_training_xla_flags([config.model], config.train.get("xla_flags", ""),
                                             config.train.get("autotune_results", "shipped"))
    multi_process = maybe_initialize_distributed()
    if jax.process_index() == 0 and autotune_line:
        print(autotune_line, flush=True)
    cache_setting = config.train.get("compilation_cache", "auto")
    if multi_process and cache_setting not in OFF:
        # JAX writes persistent-cache entries from process 0 only, so after a restart process 0
        # loads its compiled step while the others compile theirs, and the first collective times
        # out waiting for them (gloo: 30 s). All processes compiling together is the safe choice.
        print(f"{process_label()}note: the persistent compilation cache is off in multi-process runs "
              "(docs/training.md, Multi-host)")
    else:
        use_compilation_cache(cache_setting, cache_root(config))
    summary = train_and_evaluate(config, workdir)
    best = summary["best_dice"]  # -1 when no validation ran
    dice = f"best validation Dice {best:.4f}" if best >= 0 else "no validation run"
    peak = summary.get("device_peak_gib")
    memory = f"; peak device memory {peak:.1f} GiB" if peak is not None else ""
    print(f"{process_label()}done: step {summary['final_step']}, {dice}{memory}; run directory {workdir}")


if __name__ == "__main__":
    run_absl_app(main)
