"""grain input pipeline: random training patches from cached, preprocessed cases.

Every training example is a pure function of (seed, global example index), so a run restarted at
step k sees exactly the batches an uninterrupted run sees from step k on, whatever the number of
worker processes. The global batch of step k is examples [k * B, (k + 1) * B); JAX process p of P
loads the contiguous slice p * B / P ... (p + 1) * B / P of it, so processes get disjoint shards.

What each stage sees (the whole volume or the liver crop) and learns is `data.stages`; where its
foreground patches are centred is `foreground_sample`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from livseg_jax.data.augment_device import device_augment_settings
from livseg_jax.data.cache import CachedCase, open_array
from livseg_jax.data.stages import liver_crop_box, stage_target

MAX_FOREGROUND_SAMPLES = 20_000  # voxel coordinates kept per case to draw patch centres from


@dataclasses.dataclass(frozen=True)
class StageCase:
    """A cached case seen through one stage: its crop and where its foreground lies."""

    case_id: str
    image_path: str
    label_path: str
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    foreground: np.ndarray  # (N, 3) int32 voxel coordinates inside the crop (a subsample)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Returns the (D, H, W) shape of the crop."""
        return tuple(b - a for a, b in zip(self.crop_start, self.crop_stop, strict=True))

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (image float32, label uint8) of the crop, (D, H, W), memory-mapped views."""
        box = tuple(slice(a, b) for a, b in zip(self.crop_start, self.crop_stop, strict=True))
        return open_array(self.image_path)[box], open_array(self.label_path)[box]


def index_case(case: CachedCase, stage: str, liver_margin_mm: float, seed: int = 0,
               liver_mask: np.ndarray | None = None) -> StageCase:
    """Returns the StageCase of a cached case (crop + foreground sample) for `stage`.

    For the tumour stage the crop is the bounding box of `liver_mask` (e.g. a stage-1 prediction on
    the preprocessed grid) grown by the margin, or of the reference liver when it is None.
    """
    if case.label_path is None:
        raise ValueError(f"{case.source.image}: training needs a label file, none found")
    label = np.asarray(case.label)
    start, stop = (0, 0, 0), tuple(label.shape)
    if stage == "tumor":
        liver = label >= 1 if liver_mask is None else np.asarray(liver_mask, bool)
        if liver.shape != label.shape:
            raise ValueError(f"{case.source.image}: liver mask shape {liver.shape} != case shape {label.shape}")
        box = liver_crop_box(liver, case.spacing, liver_margin_mm)
        if box is None:
            what = "no liver voxels" if liver_mask is None else "the stage-1 model found no liver"
            raise ValueError(f"{case.source.label}: {what}, cannot crop for the tumour stage")
        start, stop = tuple(b.start for b in box), tuple(b.stop for b in box)
        label = label[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    return StageCase(case.case_id, str(case.image_path), str(case.label_path), start, stop,
                     foreground_sample(label, stage, seed))


def _subsample(coords: np.ndarray, size: int, seed: int) -> np.ndarray:
    if len(coords) <= size:
        return coords
    rng = np.random.default_rng([seed, len(coords)])
    return coords[rng.choice(len(coords), size, replace=False)]


def foreground_sample(label: np.ndarray, stage: str, seed: int = 0) -> np.ndarray:
    """Returns (N, 3) int32 voxel coordinates to centre foreground patches on, N <= MAX_FOREGROUND_SAMPLES.

    Binary stages: a uniform subsample of the target's foreground. Stage "joint": liver (label 1)
    and tumour (label 2) in equal numbers, the tumour's drawn with replacement when it has fewer
    voxels, so a foreground patch is centred on each class present with equal probability (nnU-Net's
    rule: a random present foreground class, then a random voxel of it). A uniform draw over the
    liver would centre on tumour about as often as tumour fills the liver, a few percent.
    """
    if stage != "joint":
        coords = np.argwhere(stage_target(label, stage) > 0).astype(np.int32)
        return _subsample(coords, MAX_FOREGROUND_SAMPLES, seed)
    present = [c for c in (np.argwhere(label == k).astype(np.int32) for k in (1, 2)) if len(c)]
    if not present:
        return np.zeros((0, 3), np.int32)
    share = MAX_FOREGROUND_SAMPLES // len(present)
    size = min(share, max(len(c) for c in present))
    parts = []
    for k, coords in enumerate(present):
        if len(coords) >= size:
            parts.append(_subsample(coords, size, seed + k))
        else:
            rng = np.random.default_rng([seed + k, len(coords)])
            parts.append(coords[rng.choice(len(coords), size, replace=True)])
    return np.concatenate(parts)


def crop_patch(volume: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """Returns volume[start : start + size], padded with `fill` where it leaves the volume."""
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, volume.shape, strict=True):
        lo, hi = max(s, 0), min(s + n, dim)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def _patch_start(center: np.ndarray, patch: Sequence[int], shape: Sequence[int]) -> list[int]:
    starts = []
    for c, p, n in zip(center, patch, shape, strict=True):
        s = int(c) - p // 2
        # Keep the patch inside the volume where the volume is large enough; centre it otherwise.
        s = min(max(s, 0), n - p) if n >= p else (n - p) // 2
        starts.append(s)
    return starts


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator, cfg) -> tuple:
    """Returns (image, target) flipped / rotated in-plane / intensity-jittered at random."""
    if cfg.affine:
        raise ValueError("data.augment.affine=True is not implemented; set it to False (random rotations "
                         "and scaling are in the device set: data.augment.device=True)")
    if cfg.flips:
        for axis in range(3):
            if rng.random() < 0.5:
                image, target = np.flip(image, axis), np.flip(target, axis)
    if cfg.rot90:
        square = image.shape[1] == image.shape[2]
        k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        image, target = np.rot90(image, k, axes=(1, 2)), np.rot90(target, k, axes=(1, 2))
    image = np.ascontiguousarray(image, dtype=np.float32)
    if cfg.intensity_scale or cfg.intensity_shift:
        scale = 1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale)
        shift = rng.uniform(-cfg.intensity_shift, cfg.intensity_shift)
        image = image * np.float32(scale) + np.float32(shift)
    return image, np.ascontiguousarray(target)


def region_margin(data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """Returns how many voxels an example extends beyond the patch along each axis: the device
    augmentation's margin when it is on (livseg_jax/data/augment_device.py), else none."""
    device = device_augment_settings(data_config)
    return tuple(device.margin) if device is not None else (0, 0, 0)


def batch_spec(data_config: ml_collections.ConfigDict, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Returns the global shape and dtype of each array of a training batch (`PatchSampler` examples
    batched by `make_dataset`, made global by `to_global_batch`), knowing only the config."""
    size = tuple(int(p) + m for p, m in zip(data_config.patch_size, region_margin(data_config), strict=True))
    return {"image": jax.ShapeDtypeStruct((global_batch, *size, 1), np.float32),
            "label": jax.ShapeDtypeStruct((global_batch, *size), np.int32)}


class PatchSampler:
    """Picklable map from a global example index to one training example (for grain workers)."""

    def __init__(self, cases: Sequence[StageCase], stage: str, data_config: ml_collections.ConfigDict,
                 seed: int, background_value: float):
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.stage = stage
        self.patch = tuple(int(p) for p in data_config.patch_size)
        self.foreground_fraction = float(data_config.foreground_fraction)
        self.augment_config = ml_collections.ConfigDict(data_config.augment.to_dict())
        # With the device augmentation on, examples are regions larger than the patch, centred on
        # the patch; the train step transforms and crops them (livseg_jax/data/augment_device.py).
        self.margin = region_margin(data_config)
        self.seed = int(seed)
        self.background_value = float(background_value)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        case = self.cases[int(rng.integers(len(self.cases)))]
        shape = case.shape
        if len(case.foreground) and rng.random() < self.foreground_fraction:
            center = case.foreground[int(rng.integers(len(case.foreground)))]
        else:
            center = np.array([rng.integers(n) for n in shape])
        start = _patch_start(center, self.patch, shape)
        start = [s - m // 2 for s, m in zip(start, self.margin, strict=True)]
        size = [p + m for p, m in zip(self.patch, self.margin, strict=True)]
        image, label = case.load()
        image = crop_patch(image, start, size, self.background_value)
        target = stage_target(crop_patch(label, start, size, 0), self.stage)
        image, target = augment(image, target, rng, self.augment_config)
        return {"image": image[..., None], "label": target.astype(np.int32)}


def local_batch_size(global_batch: int, process_count: int) -> int:
    """Returns the batch each JAX process loads, raising if the global batch does not split."""
    if global_batch % process_count:
        raise ValueError(f"data.batch_size = {global_batch} does not divide by {process_count} processes")
    return global_batch // process_count


def make_dataset(sampler: PatchSampler, global_batch: int, num_steps: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Returns a grain MapDataset of this process's batches for steps [start_step, num_steps)."""
    local = local_batch_size(global_batch, process_count)
    first = process_index * local

    def example_index(i: int) -> int:
        step, j = divmod(i, local)
        return (start_step + step) * global_batch + first + j

    total = max(num_steps - start_step, 0) * local
    return grain.MapDataset.range(total).map(example_index).map(sampler).batch(local, drop_remainder=True)


def batch_iterator(dataset: grain.MapDataset, num_workers: int, prefetch: int = 2) -> Iterator[dict]:
    """Returns an iterator over the dataset's batches, with `num_workers` grain worker processes."""
    options = grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch)
    ds = dataset.to_iter_dataset(options)
    if num_workers > 0:
        from absl import flags

        # grain's worker processes read absl flags; a program without absl.app (a notebook, an
        # argparse script) has not parsed them, and grain would fail in every worker.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def to_global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Returns the process-local numpy batch as global jax.Arrays laid out with `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
