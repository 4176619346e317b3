"""Stage 1 (liver) on the whole preprocessed volume.

`--config=configs/liver.py` is the CPU demo (small widths, runs in minutes on the built-in
synthetic data); `--config=configs/liver.py:paper` uses the paper-scale network (SPEC 1.1) and
schedule. Add a variant name to switch the model, e.g. `configs/liver.py:paper,unet`.
"""

from livseg_jax.config import stage_config, tiny_if_requested


def get_config(arg: str = ""):
    config = stage_config("liver", arg, demo_patch=(16, 64, 64), paper_patch=(48, 256, 256), demo_epochs=8,
                          source="configs/liver.py")
    return tiny_if_requested(config)  # LIVSEG_TINY=1: CI's seconds-long run of the README's commands
