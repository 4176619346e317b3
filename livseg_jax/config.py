"""The default configuration every run starts from; `configs/*.py` override parts of it.

Configs are plain data (`ml_collections.ConfigDict`). Nothing here is read at import time by other
modules: each function receives the section it needs.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

MODEL_NAMES = ("unet", "msca_unet", "elanres_unet", "elanres_msca_unet", "attention_unet", "resunet",
               "unet3plus", "riunet", "r2unet", "resunet_pp")
# train.batch_norm_stats: statistics over the whole sharded batch, or each device's shard its own
# (livseg_jax/training/step.py, docs/training.md "Devices").
BATCH_NORM_STATS = ("global", "per_device")


def model_config(name: str = "elanres_msca_unet") -> ml_collections.ConfigDict:
    """Returns the model section for one of `MODEL_NAMES` at the paper-scale default widths."""
    return ml_collections.ConfigDict(
        dict(
            name=name,
            features=(16, 32, 64, 128, 256),
            num_classes=2,
            # 3: volumetric network. 2: the axial form (SPEC 1.5, the LiTS thesis): the network runs
            # on each axial slice, its kernels and poolings never span the slice (depth) axis.
            spatial_dims=3,
            activation="silu",
            n_rep=2,  # RepConv3d blocks chained inside each ELANResBlock
            msca_stages=(1, 2, 3, 4),  # encoder stages (0-based) + bottleneck (4) that get MSCA
            msca_mode="2d",  # "2d": axial-slice trick (paper); "3d": strip kernels on all axes
            # Computation forms: same parameters, same outputs. "auto" (dense_pack_channels: None)
            # leaves them to the backend: the fastest measured on GPUs, plain convolutions elsewhere
            # (models/forms.py); a value pins one.
            depthwise_impl="auto",  # MSCA depthwise convs: "conv" (grouped), "shift" or "shift_stacked" (fused sums)
            pointwise_impl="auto",  # 1x1(x1) convs: "conv" (lax.conv) or "einsum" (matrix product)
            # > 0: stride-1 3x3x3 convs with fewer channels run on a width-packed view with about
            # this many channels (models/packed_conv.py); 0: plain convolutions.
            dense_pack_channels=ml_collections.FieldReference(None, field_type=int),
            # training-mode BatchNorm: "flax" (flax.linen.BatchNorm) or "two_stage" (the same
            # statistics with a written-out backward pass, models/batch_norm.py)
            batch_norm_impl="auto",
            dropout=0.0,  # dropout rate before the bottleneck block
            # compute dtype: "auto" (bfloat16 on GPUs, float32 elsewhere; models/forms.py), "float32" or
            # "bfloat16"; parameters, BatchNorm statistics and loss sums stay float32
            dtype="auto",
            deep_supervision=True,
            deploy=False,  # re-parameterised form: no BatchNorm, one conv per RepConv3d
        )
    )


def device_augment_config() -> ml_collections.ConfigDict:
    """Returns `data.augment.transforms`: nnU-Net v2's default training augmentation.

    Probabilities and ranges from nnU-Net v2's nnUNetTrainer.get_training_transforms and
    batchgeneratorsv2 (livseg_jax/data/augment_device.py says where each comes from). A
    probability `p_*` is per example (nnU-Net's apply_probability x p_per_channel).
    """
    return ml_collections.ConfigDict(
        dict(
            margin=(),  # voxels added to the patch per axis (even); () derives it from the ranges
            p_mirror=0.5, mirror_axes=(True, True, True),  # each allowed axis flipped with p_mirror
            # nnU-Net's rule for anisotropic patches (longest / shortest edge > 3, e.g. 48x256x256):
            # rotation in-plane only, up to 180 degrees, and scaling in-plane only ("dummy 2D");
            # for near-isotropic patches it rotates up to 30 degrees about every axis.
            p_rotation=0.2, rotation_deg=(180.0, 0.0, 0.0),  # max |angle| about the D, H, W axes
            p_scaling=0.2, scaling=(0.7, 1.4), scaling_axes=(False, True, True),  # > 1: zoom out
            # nnU-Net v2 turns elastic deformation off (p 0); ranges are batchgeneratorsv2's
            # defaults, as fractions of the patch (smoothing sigma) and of half the patch (peak).
            p_elastic=0.0, elastic_scale=(0.0, 0.2), elastic_magnitude=(0.0, 0.2),
            p_noise=0.1, noise_std=(0.0, 0.1),
            p_blur=0.1, blur_sigma=(0.5, 1.0),  # 0.2 x p_per_channel 0.5; sigma per axis, voxels
            p_brightness=0.15, brightness=(0.75, 1.25),  # multiplicative
            p_contrast=0.15, contrast=(0.75, 1.25),
            # 0.25 x p_per_channel 0.5; one factor for all axes, the slice axis left as it is
            p_low_res=0.125, low_res_scale=(0.5, 1.0), low_res_axes=(False, True, True),
            p_gamma_inverted=0.1, p_gamma=0.3, gamma=(0.7, 1.5),  # statistics kept
        )
    )


def default_cache_root() -> pathlib.Path:
    """Where caches go when `data.cache_dir` is empty: $LIVSEG_CACHE, else ~/.cache/livseg_jax."""
    return pathlib.Path(os.environ.get("LIVSEG_CACHE", "~/.cache/livseg_jax")).expanduser()


def base_config() -> ml_collections.ConfigDict:
    """Returns the full default configuration (stage 1, liver, on the built-in synthetic data)."""
    c = ml_collections.ConfigDict()
    # "liver" (stage 1, whole volume), "tumor" (stage 2, liver crop) or "joint" (one stage, whole
    # volume, 3 classes: needs model.num_classes = 3; data/stages.py)
    c.stage = "liver"
    c.seed = 0
    c.model = model_config()

    c.data = ml_collections.ConfigDict(
        dict(
            root="",  # "" -> built-in synthetic dataset (generated once, cached)
            layout="auto",  # "auto", "lits", "msd", "nnunet" or "list"
            # nnU-Net / MSD dataset.json labels -> liver / tumour, e.g. "liver=liver,tumour=tumour,
            # vessel=background" ("" -> by label name; docs/data.md, "nnU-Net v2 raw")
            label_map="",
            list_file="",  # for layout="list": lines "image_path label_path"
            cache_dir="",  # "" -> $LIVSEG_CACHE or ~/.cache/livseg_jax
            num_val_cases=2,
            # >= 2: k-fold cross-validation over the cases (data/folds.py, seed `seed`): fold `fold`
            # validates, the others train (num_val_cases unused); 0: the last num_val_cases validate.
            num_folds=0,
            fold=0,
            # The split by case id (a study's runs): given, these train and these validate (num_folds
            # 0; num_val_cases unused); () -> the rules above (data/folds.py `given_split`).
            train_cases=(),
            val_cases=(),
            synthetic=ml_collections.ConfigDict(
                dict(num_cases=10, shape=(160, 160, 64), spacing=(1.5, 1.5, 3.0), seed=1234)
            ),
            patch_size=(32, 96, 96),  # (D, H, W): each must divide by 16 (axial form: D any, e.g. 1)
            batch_size=2,  # global batch, split over all devices
            foreground_fraction=0.5,  # patches centred on a foreground voxel
            num_workers=0,  # grain worker processes (0: in the main process)
            prefetch=2,
            liver_margin_mm=10.0,  # stage 2 crop margin around the liver bounding box
            tumor_crop_source="ground_truth",  # "ground_truth" or "stage1" predictions
            stage1_run="",  # liver run / checkpoint directory used when tumor_crop_source="stage1"
            augment=ml_collections.ConfigDict(
                dict(
                    # On the host (NumPy, the paper's set): flips, in-plane 90-degree rotations,
                    # intensity scale and shift.
                    flips=True, rot90=True, intensity_scale=0.1, intensity_shift=0.1, affine=False,
                    # True: nnU-Net's set below, on the accelerator inside the jitted step; the
                    # host then delivers patch + margin regions (docs/training.md).
                    device=False,
                    transforms=device_augment_config(),
                )
            ),
        )
    )

    c.preprocess = ml_collections.ConfigDict(
        dict(
            body_threshold_hu=-500.0,
            # The grid the network sees (docs/data.md, "Spacing"): "fixed_factor" (the paper's:
            # in-plane pooled by inplane_factor, slices optionally resampled to target_slice_spacing),
            # "target" (every case resampled to target_spacing) or "median" (target_spacing set by
            # training to nnU-Net's median rule over its training cases, written into config.json).
            spacing_mode="fixed_factor",
            inplane_factor=2,  # fixed_factor; paper: x and y halved
            target_slice_spacing=0.0,  # fixed_factor; mm; 0 keeps the slice axis as it is
            target_spacing=(0.0, 0.0, 0.0),  # target/median: (z, y, x) mm; 0 keeps that axis
            image_interpolation="linear",  # target/median: "linear" or "cubic"
            label_interpolation="nearest",  # target/median: "nearest" or "linear_onehot"
            hu_min=-200.0,
            hu_max=200.0,
            hu_scale=200.0,
        )
    )

    c.loss = ml_collections.ConfigDict(
        dict(
            name="hybrid1",  # "dice", "tversky", "bce", "hybrid1" (Dice+BCE), "hybrid2" (Tversky+BCE)
            bce_weight=1.0,  # lambda
            smooth=1.0,
            tversky_alpha=0.3,
            tversky_beta=0.7,
            ds_alpha=0.4,  # deep-supervision weight at epoch 1
            ds_decay=0.8,
            ds_decay_every_epochs=30,
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(learning_rate=1e-4, decay=0.8, decay_every_epochs=30, b1=0.9, b2=0.999, eps=1e-8)
    )

    c.train = ml_collections.ConfigDict(
        dict(
            num_epochs=10,
            steps_per_epoch=50,
            log_every_steps=10,
            eval_every_epochs=2,  # <= 0 disables validation
            checkpoint_every_epochs=1,
            keep_checkpoints=3,
            donate_state=True,  # False: the step does not reuse the old state's buffers
            # 2 or 3: the first train steps run as that many programs compiled side by side (gradients
            # and the optimiser's update; or forward, backward and update), a shorter first compile on
            # GPUs, while the one program compiles in the background; the steps then switch to it, since
            # the parts' steps are slower (training/step_programs.py). 1: one program from the start.
            # None (auto): 2 on GPUs in a one-process run (session 14: cold first step 28.4-30.2 s
            # against 37.1 on an H200, the same steps per second after the switch), else 1. With
            # several processes 2 or 3 run every step as parts (they could not switch at one step).
            step_programs=ml_collections.FieldReference(None, field_type=int),
            # The CPU threads XLA may use for that background compile of the one program on a GPU
            # (`xla_gpu_force_compilation_parallelism`); the parts' steps need the host's cores
            # to dispatch meanwhile. 0: XLA's own choice (every core).
            switch_compile_threads=0,
            # Compile the train step on a background thread while the state is made and the input
            # pipeline starts (training/compile_ahead.py); False: at the first step, after them.
            compile_ahead=True,
            # BatchNorm statistics in training: "global" (over the whole batch, synchronised across
            # devices) or "per_device" (each device's shard its own, as PyTorch DDP without SyncBN).
            batch_norm_stats="global",
            # The user's own XLA flags, added to XLA_FLAGS by `livseg_jax.train` before JAX starts
            # (flags the environment sets win). The flags the model's computation forms need are
            # added without being listed here (livseg_jax/xla_flags.py), also by `predict`.
            xla_flags="",
            # XLA GPU autotuning results loaded before the first compile (livseg_jax/xla_flags.py):
            # "shipped" (the package's, for these exact jaxlib / CUDA plugin / cuDNN versions, when it
            # has them), "off", or a results file. They save the first compile's autotuning (42 s of
            # 87 s for the liver :paper step on an H200, docs/benchmarks.md).
            autotune_results="shipped",
            # JAX's persistent compilation cache, turned on by `livseg_jax.train`: "auto" ->
            # <cache root>/jax_compilation, "off", or a directory. Restarts skip recompiling.
            compilation_cache="auto",
            tensorboard=False,
        )
    )

    c.inference = ml_collections.ConfigDict(
        dict(
            window=(),  # () -> the training patch size
            overlap=0.5,
            batch_size=2,
            gaussian_sigma_scale=0.125,
            mirror_tta=False,
            deploy=True,
        )
    )
    return c


FEWSHOT_SPACING = (1.6, 1.5, 1.5)  # (z, y, x) mm: the real-CT benchmark's target grid (docs/real_data.md)


def stage_config(stage: str, arg: str, demo_patch: tuple, paper_patch: tuple, demo_epochs: int,
                 source: str) -> ml_collections.ConfigDict:
    """Returns the config of one stage with the demo or ':paper' preset and an optional variant.

    `arg` is the text after ':' in `--config=configs/<stage>.py:ARG`: comma-separated, 'paper' or
    'fewshot' and/or one of MODEL_NAMES; anything else raises ValueError naming `source`.
    'fewshot' is the paper's network and schedule with the recipe that won the real-CT benchmark
    (docs/real_data.md, arm c): every case resampled to 1.6 x 1.5 x 1.5 mm and nnU-Net's
    augmentation set on the device, at the benchmark's learning rate 1e-3.
    """
    parts = [p for p in arg.split(",") if p]
    unknown = [p for p in parts if p not in MODEL_NAMES + ("paper", "fewshot")]
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {unknown}; use 'paper' or 'fewshot' and/or {MODEL_NAMES}")
    config = base_config()
    config.stage = stage
    if "paper" in parts or "fewshot" in parts:
        config.data.patch_size = tuple(paper_patch)
        config.train.num_epochs = 300
        config.train.steps_per_epoch = 250
        config.train.eval_every_epochs = 10
        # dtype stays "auto": bfloat16 on GPUs, where a 5,000-step real-CT run matched float32's
        # validation Dice (experiments/results/bf16_long_h200.json); `--config.model.dtype=float32`
        # trains as the paper does.
    else:
        # CPU demo: a narrow network and small patches; a 10x higher learning rate than the
        # paper's so that a few hundred steps give a visibly working model.
        config.model.features = (8, 16, 32, 32, 64)
        config.data.patch_size = tuple(demo_patch)
        config.optim.learning_rate = 1e-3
        config.train.num_epochs = demo_epochs
        config.train.steps_per_epoch = 50
        config.train.eval_every_epochs = 2
    if "fewshot" in parts:
        config.preprocess.spacing_mode = "target"
        config.preprocess.target_spacing = FEWSHOT_SPACING
        config.data.augment.device = True
        config.optim.learning_rate = 1e-3
    for part in parts:
        if part in MODEL_NAMES:
            config.model.name = part
    return config


# LIVSEG_TINY=1 (CI's run of the README's commands, tools/newcomer_path.py): the same pipeline at a
# size that trains in seconds (a U-Net: the paper network's initialisation alone compiles for
# minutes on a CPU); 10 phantoms still, so the README's held-out `volume-9` exists.
TINY_OVERRIDES = {"model.name": "unet", "model.features": (4, 8), "data.patch_size": (16, 16, 16),
                  "data.synthetic.shape": (64, 64, 32), "data.synthetic.spacing": (4.0, 4.0, 6.0),
                  "train.num_epochs": 1, "train.steps_per_epoch": 2, "train.eval_every_epochs": 1}


def tiny_if_requested(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config` shrunk by TINY_OVERRIDES when $LIVSEG_TINY is 1, unchanged when it is unset or 0."""
    value = os.environ.get("LIVSEG_TINY", "0")
    if value not in ("0", "1"):
        raise ValueError(f"LIVSEG_TINY must be 0 or 1 (CI's tiny newcomer-path run), got {value!r}")
    if value == "1":
        config.update_from_flattened_dict(TINY_OVERRIDES)
    return config
