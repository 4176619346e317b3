"""Paper Tables 3-5: the ablation of ELANRes and MSCA (two-stage, each network in both stages).

`--config=configs/studies/ablation.py` is the smoke scale (tiny widths, two steps per stage, the
built-in synthetic data: minutes on a CPU); `:paper` the paper-scale networks and schedule.
"""

from livseg_jax.study.spec import column, run, study_config, table

NETWORKS = {"UNet": "unet", "MSCA-UNet": "msca_unet", "ELANRes-UNet": "elanres_unet",
            "ELANRes-MSCA-UNet": "elanres_msca_unet"}
FULL = "ELANRes-MSCA-UNet"


def get_config(arg: str = ""):
    c = study_config("ablation", arg, "configs/studies/ablation.py",
                     "Ablation of the ELANRes blocks and MSCA attention (paper Tables 3-5).")
    c.runs = tuple(run(name, "two_stage", {"model.name": model}) for name, model in NETWORKS.items())
    rows = tuple(NETWORKS)
    c.tables = (
        table("table3", "Table 3: liver segmentation", rows, (
            column("liver Dice", "liver.dice", 3, {"UNet": 0.937, "MSCA-UNet": 0.946, FULL: 0.972}),
            column("liver ASD (mm)", "liver.asd", 3, {"UNet": 3.242, "ELANRes-UNet": 2.369, FULL: 1.263}),
        )),
        table("table4", "Table 4: tumour segmentation", rows, (
            column("tumour Dice", "tumor.dice", 3, {FULL: 0.729}),
            column("tumour ASD (mm)", "tumor.asd", 3, {FULL: 1.012}),
            column("tumour RVD", "tumor.rvd", 3),
            column("tumour precision", "tumor.precision", 3, {FULL: 0.564}),
            column("tumour recall", "tumor.recall", 3),
        )),
        table("table5", "Table 5: cost", rows, (
            column("parameters (both stages)", "params"),
            column("training time (s)", "train_s", 1),
            column("test time (s per case)", "test_s_per_case", 2),
        ), note="Parameters and training time count both stages of the two-stage pair."),
    )
    return c
