"""Stage 1 (liver). Use `--config=configs/liver.py:VARIANT` to pick a model variant, or
`--config=configs/liver.py:tiny` for the small CPU demo."""

from livseg_jax.config import MODEL_NAMES, base_config


def get_config(arg: str = ""):
    config = base_config()
    config.stage = "liver"
    for part in filter(None, arg.split(",")):
        if part in MODEL_NAMES:
            config.model.name = part
        elif part == "tiny":
            config.model.features = (8, 16, 16, 32, 32)
            config.data.patch_size = (16, 64, 64)
        elif part == "paper":
            config.data.patch_size = (48, 256, 256)
        else:
            raise ValueError(f"configs/liver.py: unknown argument {part!r}")
    return config
