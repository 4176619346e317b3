"""Stage 2 (tumour) on liver bounding-box crops (ground-truth liver + `data.liver_margin_mm`).

`--config=configs/tumor.py` is the CPU demo (small widths, 500 steps on the built-in synthetic
data; the README's "Quick start" gives its measured time); `--config=configs/tumor.py:paper` uses
the paper-scale network (SPEC 1.1) and schedule, `:fewshot` the real-CT recipe (docs/real_data.md).
Add a variant name to switch the model, e.g. `:paper,msca_unet`.
"""

from livseg_jax.config import stage_config, tiny_if_requested


def get_config(arg: str = ""):
    config = stage_config("tumor", arg, demo_patch=(16, 48, 48), paper_patch=(48, 128, 128), demo_epochs=10,
                          source="configs/tumor.py")
    config.data.foreground_fraction = 0.7  # tumours are small: oversample them
    return tiny_if_requested(config)  # LIVSEG_TINY=1: CI's seconds-long run of the README's commands
