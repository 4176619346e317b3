"""Run a study: `python -m livseg_jax.study --config=configs/studies/NAME.py[:paper] --workdir=DIR`.

Options: `--config.data.root=DIR` (real data; default the built-in synthetic set), any other
`--config.<key>=value`, and `--runs=a,b` to run only those runs (the tables still show every run
finished in DIR). Rerunning the same command resumes: finished runs are not trained again.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from livseg_jax.compilation_cache import use_compilation_cache
from livseg_jax.config import default_cache_root
from livseg_jax.study import spec
from livseg_jax.study.runner import run_study
from livseg_jax.xla_flags import apply_model_xla_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "study config file (configs/studies/NAME.py[:paper])")
_WORKDIR = flags.DEFINE_string("workdir", "", "study directory (default: studies/<name>-<scale>)")
_RUNS = flags.DEFINE_list("runs", [], "only these runs (default: all)")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/studies/NAME.py is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    study = _CONFIG.value
    # Before anything starts a backend: the XLA flags every run's network forms need.
    models = [c.model for entry in study.runs for c in (spec.stage_run_config(study, entry, stage, "", 1)
                                                        for stage in spec.run_stages(entry))]
    apply_model_xla_flags(models)
    cache = pathlib.Path(study.data.cache_dir).expanduser() if study.data.cache_dir else default_cache_root()
    use_compilation_cache("auto", cache)
    workdir = _WORKDIR.value or str(pathlib.Path("studies") / f"{study.name}-{study.scale}")
    out = run_study(study, workdir, _RUNS.value)
    print(f"done: {out['tables']['md']}" + (f", figure {out['figure']}" if out["figure"] else ""))


if __name__ == "__main__":
    app.run(main)
