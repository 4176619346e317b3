"""Paper Table 2: the five training losses, ELANRes-MSCA-UNet in both stages of the two-stage pair.

`--config=configs/studies/losses.py` is the smoke scale; `:paper` the paper-scale networks and schedule.
"""

from livseg_jax.study.spec import column, run, study_config, table

LOSSES = {"Dice": "dice", "Tversky": "tversky", "BCE": "bce", "HybridLoss1": "hybrid1", "HybridLoss2": "hybrid2"}


def get_config(arg: str = ""):
    c = study_config("losses", arg, "configs/studies/losses.py",
                     "Training losses (paper Table 2): HybridLoss1 = Dice + BCE, HybridLoss2 = Tversky + BCE.")
    c.runs = tuple(run(name, "two_stage", {"model.name": "elanres_msca_unet", "loss.name": loss})
                   for name, loss in LOSSES.items())
    c.tables = (
        table("table2", "Table 2: loss functions", tuple(LOSSES), (
            column("liver Dice", "liver.dice", 3, {"HybridLoss1": 0.972, "HybridLoss2": 0.968, "Dice": 0.951,
                                                   "Tversky": 0.949, "BCE": 0.958}),
            column("tumour Dice", "tumor.dice", 3, {"HybridLoss1": 0.729}),
        )),
    )
    return c
