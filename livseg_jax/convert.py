"""Convert weights between PyTorch and livseg_jax run directories; export deploy networks (ONNX, StableHLO).

    python -m livseg_jax.convert --config=configs/liver.py --from-torch in.pt --out RUN_DIR [--force]
    python -m livseg_jax.convert --to-torch RUN_DIR --out out.pt|out.safetensors [--which best|latest]
                                 [--deploy] [--force]
    python -m livseg_jax.convert --to-onnx RUN_DIR --out model.onnx [--window D,H,W] [--which ...] [--force]
    python -m livseg_jax.convert --to-stablehlo RUN_DIR --out model.stablehlo [--window D,H,W]
                                 [--platforms cpu,cuda] [--batch N] [--which ...] [--force]

--from-torch reads a .pt/.pth (weights only, never arbitrary pickles) or .safetensors state dict
of the PyTorch twin (`livseg_jax.interop.torch_models`), training or re-parameterised form (read
from the keys), and writes a run directory (`livseg_jax.run_dir`: config.json + an orbax
checkpoint) that `predict`, `evaluate` and `--to-torch` read like a trained one.
--to-torch reads any run directory, trained (best checkpoint, else the latest; `--which`) or
converted; its config.json names the model unless --config is given. It writes the twin's state
dict; --deploy re-parameterises first.
--to-onnx and --to-stablehlo export the deploy network for one sliding window (default: the run's
`inference.window`, else `data.patch_size`) with a dynamic batch axis: image (batch, D, H, W, 1)
float32 -> logits (batch, D, H, W, K) float32. A training-form run is re-parameterised first. The
run's config, the window and its post-processing go with the model (ONNX `metadata_props`; the
JSON `model.stablehlo.json` beside the StableHLO artefact), so `predict --backend onnxruntime`
needs nothing else. ONNX goes through the PyTorch twin (3D forms only; `onnx` extra); StableHLO
through `jax.export` (any form), lowered for `--platforms`; it also writes the bare StableHLO
module `model.stablehlo.mlirbc` for servers without JAX, with a static batch given `--batch`.

A bad flag, file or weight ends in one `error:` line naming it (`livseg_jax.cli_errors`; `--debug`
keeps the traceback); the output is checked (writable, free space) before anything is read.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Sequence

import ml_collections

from livseg_jax import run_dir
from livseg_jax.atomic_write import refuse_overwrite
from livseg_jax.cli_errors import (
    CliError,
    check_output_dir,
    check_output_file,
    parse_command_flags,
    parse_dhw,
    run_main,
    total_size,
)
from livseg_jax.inference import backends
from livseg_jax.inference.two_stage import stage_window
from livseg_jax.interop import io, mapping, stablehlo_export


def convert_from_torch(in_path: str | pathlib.Path, out_dir: str | pathlib.Path,
                       config: ml_collections.ConfigDict, force: bool = False) -> pathlib.Path:
    """Returns `out_dir` after writing a run directory holding the weights of a torch file."""
    state_dict = io.load_state_dict(in_path)
    deploy = mapping.is_deploy_state_dict(state_dict)
    try:
        variables = mapping.state_dict_to_variables(state_dict, config.model, deploy=deploy)
    except mapping.ConversionError as e:
        raise mapping.ConversionError(
            f"{in_path} -> model {config.model.name!r} (features {tuple(config.model.features)}, "
            f"{'deploy' if deploy else 'training'} form)", e.missing, e.unexpected, e.mismatched
        ) from None
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.deploy = deploy
    return run_dir.write_variables(out_dir, variables, config, force=force)


def convert_to_torch(ckpt_dir: str | pathlib.Path, out_path: str | pathlib.Path,
                     config: ml_collections.ConfigDict | None = None, deploy: bool = False,
                     force: bool = False, which: str = "best") -> pathlib.Path:
    """Returns `out_path` after writing the torch state dict of a run directory's checkpoint."""
    variables, saved_config = run_dir.load_variables(ckpt_dir, which)
    model_config = (config or saved_config).model
    if deploy and "batch_stats" in variables:
        from livseg_jax.models import reparameterize

        variables = reparameterize(variables)
    try:
        state_dict = mapping.variables_to_state_dict(variables, model_config)
    except mapping.ConversionError as e:
        raise mapping.ConversionError(
            f"{ckpt_dir} -> torch model {model_config.name!r}", e.missing, e.unexpected, e.mismatched
        ) from None
    return io.save_state_dict(out_path, state_dict, force=force)


def export_run(kind: str, run_path: str | os.PathLike, out_path: str | os.PathLike,
               window: Sequence[int] | None = None, which: str = "best", force: bool = False,
               platforms: Sequence[str] = stablehlo_export.DEFAULT_PLATFORMS, batch: int | None = None) -> pathlib.Path:
    """Returns `out_path` after exporting a run's deploy network as `kind` ("onnx" or "stablehlo")."""
    variables, config = backends.deploy_variables(run_path, which)
    window = stage_window(run_path, config, window)
    metadata = backends.export_metadata(run_path, config, window, which)
    if kind == "onnx":
        from livseg_jax.interop import onnx_export

        onnx_export.check_exportable(config.model)
        return onnx_export.export_onnx(variables, config.model, window, out_path, metadata, force=force)
    if kind == "stablehlo":
        return stablehlo_export.export_stablehlo(variables, config.model, window, out_path, metadata,
                                                 platforms, force=force, batch=batch)
    raise ValueError(f"unknown export kind {kind!r}; expected 'onnx' or 'stablehlo'")


def _run(argv: list[str]) -> int:
    """Parses the flags (module docstring) and converts; returns the exit status."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()  # not absl's global FLAGS: main() can run more than once in a process
    full_argv = ["convert", *argv]  # config_flags reads its overrides from here, not from sys.argv
    config_flag = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/liver.py[:variant]",
                                                  flag_values=fv, sys_argv=full_argv)
    from_flag = flags.DEFINE_string("from-torch", None, "PyTorch weights (.pt, .pth, .safetensors)",
                                    flag_values=fv)
    to_flag = flags.DEFINE_string("to-torch", None, "run directory to export (trained or converted)",
                                  flag_values=fv)
    onnx_flag = flags.DEFINE_string("to-onnx", None, "run directory to export as ONNX (deploy form)",
                                    flag_values=fv)
    hlo_flag = flags.DEFINE_string("to-stablehlo", None, "run directory to export as StableHLO (jax.export)",
                                   flag_values=fv)
    out_flag = flags.DEFINE_string("out", None, "a run directory (--from-torch), a weight file (--to-torch) or "
                                   "the exported model (--to-onnx, --to-stablehlo)", flag_values=fv)
    window_flag = flags.DEFINE_string("window", None, "--to-onnx/--to-stablehlo: D,H,W of the sliding window "
                                      "(default: the run's inference.window, else data.patch_size)", flag_values=fv)
    platforms_flag = flags.DEFINE_list("platforms", list(stablehlo_export.DEFAULT_PLATFORMS),
                                       "--to-stablehlo: platforms to lower for (cpu, cuda, rocm, tpu)",
                                       flag_values=fv)
    batch_flag = flags.DEFINE_integer("batch", None, "--to-stablehlo: a static batch size (default: symbolic)",
                                      lower_bound=1, flag_values=fv)
    which_flag = flags.DEFINE_enum("which", "best", list(run_dir.WHICH),
                                   "--to-torch: checkpoint of a trained run (best falls back to latest)",
                                   flag_values=fv)
    deploy_flag = flags.DEFINE_boolean("deploy", False, "--to-torch: re-parameterise first", flag_values=fv)
    force_flag = flags.DEFINE_boolean("force", False, "overwrite an existing output", flag_values=fv)
    if not parse_command_flags(fv, full_argv, __doc__):
        return 0
    sources = [f.value for f in (from_flag, to_flag, onnx_flag, hlo_flag)]
    if sum(bool(v) for v in sources) != 1:
        raise CliError(None, "give exactly one of --from-torch FILE, --to-torch DIR, --to-onnx DIR or "
                             "--to-stablehlo DIR")
    if not out_flag.value:
        raise CliError(None, "--out is required")
    out = pathlib.Path(out_flag.value)
    if onnx_flag.value or hlo_flag.value:
        kind, source = ("onnx", onnx_flag.value) if onnx_flag.value else ("stablehlo", hlo_flag.value)
        window = parse_dhw(window_flag.value, "--window") if window_flag.value else None
        outputs = [out] if kind == "onnx" else stablehlo_export.output_paths(out)
        for path in outputs:
            check_output_file(path, need_bytes=total_size([source]) // 2)  # the optimiser state is not exported
        refuse_overwrite(outputs, force_flag.value)
        written = export_run(kind, source, out, window, which_flag.value,
                             force_flag.value, platforms_flag.value, batch_flag.value)
    elif from_flag.value:
        if config_flag.value is None:
            raise CliError(None, "--from-torch needs --config (it names the model)")
        check_output_dir(out, need_bytes=total_size([from_flag.value]))
        refuse_overwrite([out], force_flag.value)
        written = convert_from_torch(from_flag.value, out, config_flag.value, force=force_flag.value)
    else:
        check_output_file(out, need_bytes=total_size([to_flag.value]) // 2)  # optimiser state is not exported
        refuse_overwrite([out], force_flag.value)
        written = convert_to_torch(to_flag.value, out, config_flag.value, deploy=deploy_flag.value,
                                   force=force_flag.value, which=which_flag.value)
    print(f"wrote {written}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (flags in the module docstring); returns the exit status."""
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
