"""Stage 1 (liver) on the whole preprocessed volume.

`--config=configs/liver.py` is the CPU demo (small widths, runs in minutes on the built-in
synthetic data); `--config=configs/liver.py:paper` uses the paper-scale network (SPEC 1.1) and
schedule. Add a variant name to switch the model, e.g. `configs/liver.py:paper,unet`.
"""

from livseg_jax.config import MODEL_NAMES, base_config


def get_config(arg: str = ""):
    parts = [p for p in arg.split(",") if p]
    unknown = [p for p in parts if p not in MODEL_NAMES + ("paper",)]
    if unknown:
        raise ValueError(f"configs/liver.py: unknown argument(s) {unknown}; use 'paper' and/or {MODEL_NAMES}")
    config = base_config()
    config.stage = "liver"
    if "paper" in parts:
        config.data.patch_size = (48, 256, 256)
        config.train.num_epochs = 300
        config.train.steps_per_epoch = 250
        config.train.eval_every_epochs = 10
        # float32: bf16 training currently turns NaN on GPUs (docs/performance_notes.md).
        config.model.dtype = "float32"
        config.inference.window = (48, 256, 256)
    else:
        # CPU demo: a narrow network and small patches; a 10x higher learning rate than the paper's
        # so that a few hundred steps give a visibly working model.
        config.model.features = (8, 16, 32, 32, 64)
        config.data.patch_size = (16, 64, 64)
        config.optim.learning_rate = 1e-3
        config.train.num_epochs = 8
        config.train.steps_per_epoch = 50
        config.train.eval_every_epochs = 2
    for part in parts:
        if part in MODEL_NAMES:
            config.model.name = part
    return config
