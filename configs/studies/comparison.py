"""Paper Tables 7-9: ELANRes-MSCA-UNet against 3D Attention U-Net, ResUNet++, R2U-Net and RIU-Net.

Each network in both stages of the two-stage pair, same data and schedule. The published values of
these tables are not carried yet: their cells stay empty. `:paper` for the paper scale.
"""

from livseg_jax.study.spec import column, run, study_config, table

NETWORKS = {"Attention U-Net": "attention_unet", "ResUNet++": "resunet_pp", "R2U-Net": "r2unet",
            "RIU-Net": "riunet", "ELANRes-MSCA-UNet": "elanres_msca_unet"}


def get_config(arg: str = ""):
    c = study_config("comparison", arg, "configs/studies/comparison.py",
                     "Comparison networks against ours (paper Tables 7-9).")
    c.runs = tuple(run(name.replace(" ", "_"), "two_stage", {"model.name": model})
                   for name, model in NETWORKS.items())
    rows = tuple(r["name"] for r in c.runs)
    c.tables = (
        table("table7", "Table 7: liver segmentation", rows, (
            column("liver Dice", "liver.dice"), column("liver IoU", "liver.iou"),
            column("liver ASD (mm)", "liver.asd"), column("liver RVD", "liver.rvd"),
        )),
        table("table8", "Table 8: tumour segmentation", rows, (
            column("tumour Dice", "tumor.dice"), column("tumour ASD (mm)", "tumor.asd"),
            column("tumour RVD", "tumor.rvd"), column("tumour precision", "tumor.precision"),
            column("tumour recall", "tumor.recall"),
        )),
        table("table9", "Table 9: cost", rows, (
            column("parameters (both stages)", "params"),
            column("training time (s)", "train_s", 1),
            column("test time (s per case)", "test_s_per_case", 2),
        )),
    )
    return c
