"""Stage 2 (tumour, inside the liver bounding box). Arguments as for configs/liver.py."""

from livseg_jax.config import MODEL_NAMES, base_config


def get_config(arg: str = ""):
    config = base_config()
    config.stage = "tumor"
    config.data.patch_size = (32, 64, 64)
    config.data.foreground_fraction = 0.7
    for part in filter(None, arg.split(",")):
        if part in MODEL_NAMES:
            config.model.name = part
        elif part == "tiny":
            config.model.features = (8, 16, 16, 32, 32)
            config.data.patch_size = (16, 48, 48)
        elif part == "paper":
            config.data.patch_size = (48, 128, 128)
        else:
            raise ValueError(f"configs/tumor.py: unknown argument {part!r}")
    return config
