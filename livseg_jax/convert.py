"""Convert weights between PyTorch and livseg_jax.

    python -m livseg_jax.convert --config=configs/liver.py --from-torch in.pt --out DIR [--force]
    python -m livseg_jax.convert --to-torch DIR --out out.pt|out.safetensors [--deploy] [--force]

--from-torch reads a .pt/.pth (weights only, never arbitrary pickles) or .safetensors state dict
of the PyTorch twin (`livseg_jax.interop.torch_models`), training or re-parameterised form (read
from the keys), and writes a portable checkpoint folder (variables.msgpack + config.json).
--to-torch reads such a folder (its config.json names the model unless --config is given) and
writes the twin's state dict; --deploy re-parameterises first.
"""

from __future__ import annotations

import pathlib

import ml_collections

from livseg_jax.interop import io, mapping


def convert_from_torch(in_path: str | pathlib.Path, out_dir: str | pathlib.Path,
                       config: ml_collections.ConfigDict, force: bool = False) -> pathlib.Path:
    """Writes the Flax checkpoint of a torch weight file to `out_dir`; returns the folder."""
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
    return io.save_variables(out_dir, variables, config, force=force)


def convert_to_torch(ckpt_dir: str | pathlib.Path, out_path: str | pathlib.Path,
                     config: ml_collections.ConfigDict | None = None, deploy: bool = False,
                     force: bool = False) -> pathlib.Path:
    """Writes the torch state dict of a Flax checkpoint folder to `out_path`; returns the path."""
    variables, saved_config = io.load_variables(ckpt_dir)
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


def main() -> None:
    """Command-line entry point (flags in the module docstring)."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None,
                                                  "config file, e.g. configs/liver.py[:variant]")
    from_flag = flags.DEFINE_string("from-torch", None, "PyTorch weights (.pt, .pth, .safetensors)")
    to_flag = flags.DEFINE_string("to-torch", None, "portable Flax checkpoint folder to export")
    out_flag = flags.DEFINE_string("out", None, "a folder (--from-torch) or a weight file (--to-torch)")
    deploy_flag = flags.DEFINE_boolean("deploy", False, "--to-torch: re-parameterise first")
    force_flag = flags.DEFINE_boolean("force", False, "overwrite an existing output")

    def run(argv) -> None:
        del argv
        if bool(from_flag.value) == bool(to_flag.value):
            raise app.UsageError("give exactly one of --from-torch FILE or --to-torch DIR")
        if not out_flag.value:
            raise app.UsageError("--out is required")
        if from_flag.value:
            if config_flag.value is None:
                raise app.UsageError("--from-torch needs --config (it names the model)")
            out = convert_from_torch(from_flag.value, out_flag.value, config_flag.value,
                                     force=force_flag.value)
        else:
            out = convert_to_torch(to_flag.value, out_flag.value, config_flag.value,
                                   deploy=deploy_flag.value, force=force_flag.value)
        print(f"wrote {out}")

    app.run(run)


if __name__ == "__main__":
    main()
