"""One-stage model: background, liver and tumour (3 classes) on the whole preprocessed volume.

The LiTS thesis's one-stage 3-class 3D U-Net baseline, to compare with the two-stage pair
(`configs/liver.py` + `configs/tumor.py`) on the same data: same whole-volume patches as stage 1,
the label map itself as the target, predicted with `python -m livseg_jax.predict --joint RUN`.
`--config=configs/joint.py` is the CPU demo on the built-in synthetic data;
`--config=configs/joint.py:paper` the paper-scale network and schedule. Add a variant name to
switch the model, e.g. `configs/joint.py:paper,unet` (the thesis's baseline is a U-Net).
"""

from livseg_jax.config import stage_config


def get_config(arg: str = ""):
    config = stage_config("joint", arg, demo_patch=(16, 64, 64), paper_patch=(48, 256, 256), demo_epochs=8,
                          source="configs/joint.py")
    config.model.num_classes = 3  # background, liver, tumour (data.stages.STAGE_CLASSES)
    return config
