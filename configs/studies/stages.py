"""The LiTS thesis's tables a/b/d/e: one-stage against two-stage, and the backbones of the two stages.

Runs: a one-stage 3-class 3D U-Net (`configs/joint.py`) and two-stage stacks of U-Net, UNet 3+,
Attention U-Net and ResUNet. The thesis trains its stacks on axial 2D slices; these runs are the
3D forms (add `"model.spatial_dims": 2` and a depth-1 patch to a run's overrides for the axial ones).
`:paper` for the paper scale.
"""

from livseg_jax.study.spec import column, run, study_config, table

BACKBONES = {"UNet": "unet", "UNet+++": "unet3plus", "AttUNet": "attention_unet", "ResUNet": "resunet"}
ONE_STAGE = "1Stage-3D-UNet"
DICE_NOTE = ("The thesis reports one Dice per network; the text this study was written from does not say "
             "over which structures, so it stands beside our mean of the liver and tumour Dice.")


def _scores():
    return (column("Dice (mean of liver, tumour)", "dice_mean"), column("liver Dice", "liver.dice"),
            column("tumour Dice", "tumor.dice"), column("liver IoU", "liver.iou"),
            column("tumour IoU", "tumor.iou"), column("mean IoU", "mean_iou"))


def get_config(arg: str = ""):
    c = study_config("stages", arg, "configs/studies/stages.py",
                     "One-stage against two-stage, and stage backbones (the LiTS thesis).")
    c.runs = (run(ONE_STAGE, "one_stage", {"model.name": "unet"}),
              *(run(name, "two_stage", {"model.name": model}) for name, model in BACKBONES.items()))
    dice_mean, *rest = _scores()
    c.tables = (
        table("a", "Table a: one-stage methods", (ONE_STAGE,),
              (column(dice_mean["label"], "dice_mean", 3, {ONE_STAGE: 0.702}), *rest),
              note=DICE_NOTE + " The thesis's other one-stage methods, YOLOv7-seg (0.792) and CycleGAN (0.192), "
                               "are not networks of this library."),
        table("b", "Table b: two-stage backbones", tuple(BACKBONES),
              (column(dice_mean["label"], "dice_mean", 3,
                      {"UNet": 0.934, "UNet+++": 0.925, "AttUNet": 0.843, "ResUNet": 0.930}), *rest),
              note=DICE_NOTE),
        table("d", "Table d: one-stage U-Net against the two-stage U-Net", (ONE_STAGE, "UNet"),
              (column(dice_mean["label"], "dice_mean", 3, {"UNet": 0.934}), *rest),
              note=DICE_NOTE + " The thesis's one-stage UNet of this table (0.871) is its axial 2D network, "
                               "not this 3D one-stage run, so its value is quoted here and not placed in a cell."),
        table("e", "Table e: stage-1 backbones, liver Dice", tuple(BACKBONES),
              (column("stage-1 liver Dice", "liver.dice", 3,
                      {"UNet": 0.849, "UNet+++": 0.906, "AttUNet": 0.919, "ResUNet": 0.910}),),
              note="Published: on CHAOS (healthy livers). Ours: the liver of the two-stage runs on this study's "
                   "data; give CHAOS CT with `--config.data.root` to compare like with like."),
    )
    return c
