"""Parameter and FLOP counts of every network of `models.build.NETWORKS`.

    python -m livseg_jax.models.summary --config=configs/liver.py [--patch=48,256,256] [--batch=1]

FLOPs are XLA's cost analysis of the jitted evaluation-mode forward pass (one multiply-add = 2
FLOPs) in the reference computation forms, so they count the model's depthwise and 1x1
convolutions as they run, the same on every backend.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from livseg_jax.cli_errors import CliError, parse_command_flags, parse_dhw, run_main
from livseg_jax.models.build import NETWORKS, build_model, variable_shapes
from livseg_jax.models.forms import REFERENCE_FORMS
from livseg_jax.models.unet import check_patch_shape


def count_params(model_config: ml_collections.ConfigDict, patch: Sequence[int]) -> dict[str, int]:
    """Returns {"params": trainable count, "batch_stats": BatchNorm statistics count}."""
    shapes = variable_shapes(build_model(model_config), patch)
    return {k: int(sum(np.prod(a.shape) for a in jax.tree.leaves(v))) for k, v in shapes.items()}


def forward_flops(model_config: ml_collections.ConfigDict, patch: Sequence[int], batch: int = 1) -> float:
    """Returns XLA's FLOP count of one evaluation-mode forward pass on a (batch, *patch) input.

    Counted in the reference computation forms on every backend: width packing's extra
    multiply-adds are by zeros, work of the GPU form, not of the model."""
    model_config = ml_collections.ConfigDict(model_config.to_dict())
    model_config.update(REFERENCE_FORMS)
    model = build_model(model_config)
    x = jax.ShapeDtypeStruct((batch, *patch, 1), jnp.float32)
    variables = variable_shapes(model, patch, batch)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def summary_table(base: ml_collections.ConfigDict, patch: Sequence[int], batch: int = 1) -> str:
    """Returns a Markdown table of parameters and forward GFLOPs for every network of NETWORKS."""
    check_patch_shape(patch, len(base.model.features))
    rows = ["| variant | parameters | BatchNorm statistics | forward GFLOP |", "|---|---:|---:|---:|"]
    for name in NETWORKS:
        cfg = ml_collections.ConfigDict(base.model.to_dict())
        cfg.name = name
        counts = count_params(cfg, patch)
        flops = forward_flops(cfg, patch, batch)
        rows.append(f"| `{name}` | {counts['params']:,} | {counts.get('batch_stats', 0):,} | "
                    f"{flops / 1e9:.1f} |")
    shape = "x".join(map(str, patch))
    return "\n".join(rows) + f"\n\nPatch {shape}, batch {batch}, features {tuple(base.model.features)}."


def _run(argv: list[str]) -> int:
    """Parses the flags and prints the table; returns the exit status."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()  # not absl's global FLAGS: main() can run more than once in a process
    full_argv = ["summary", *argv]  # config_flags reads its overrides from here, not from sys.argv
    config_flag = config_flags.DEFINE_config_file("config", "configs/liver.py", "config file",
                                                  flag_values=fv, sys_argv=full_argv)
    patch_flag = flags.DEFINE_string("patch", "", "D,H,W (default: the config's patch_size)", flag_values=fv)
    batch_flag = flags.DEFINE_integer("batch", 1, "batch size", lower_bound=1, flag_values=fv)
    if not parse_command_flags(fv, full_argv, __doc__):
        return 0
    config = config_flag.value
    if patch_flag.value:
        patch = parse_dhw(patch_flag.value, "--patch")
    else:
        patch = tuple(config.data.patch_size)
        if len(patch) != 3:
            raise CliError("data.patch_size", f"expected (D, H, W), got {patch}")
    try:
        check_patch_shape(patch, len(config.model.features), config.model.get("spatial_dims", 3))
    except ValueError as e:
        raise CliError("--patch" if patch_flag.value else "data.patch_size", str(e)) from None
    print(summary_table(config, patch, batch_flag.value))
    return 0


def quiet_backend_probe() -> None:
    """Hides the INFO lines of JAX's search for accelerators (e.g. "Unable to initialize backend 'tpu'"
    where libtpu is installed without a TPU); returns nothing. Warnings a user can act on (a GPU
    without a CUDA jaxlib) stay."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # C++ (XLA, libtpu) INFO lines; read when JAX starts
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: prints the table for the config's (or --patch) patch size."""
    quiet_backend_probe()  # the table is on the CPU: the probe's INFO lines tell the user nothing
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
