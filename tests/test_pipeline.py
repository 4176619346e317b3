"""grain input pipeline: determinism, resume, process shards, workers, sampling and augmentation."""

import numpy as np
import pytest

from livseg_jax.config import base_config
from livseg_jax.data import pipeline
from livseg_jax.data.cache import build_cache
from livseg_jax.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def stage_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cases = write_synthetic_dataset(root / "syn", 3, (96, 96, 32), (2.0, 2.0, 4.0), seed=3)
    cached = build_cache(cases, base_config().preprocess, root / "cache", progress=False)
    return {stage: [pipeline.index_case(c, stage, 10.0) for c in cached] for stage in ("liver", "tumor")}


def data_config(**overrides):
    c = base_config().data
    c.patch_size = (16, 32, 32)
    c.update(overrides)
    return c


def batches(sampler, n, workers=0, **kw):
    it = pipeline.batch_iterator(pipeline.make_dataset(sampler, 4, n, **kw), num_workers=workers)
    return [next(it) for _ in range(n - kw.get("start_step", 0))]


def test_same_seed_same_batches_and_other_seed_other_batches(stage_cases):
    make = lambda seed: pipeline.PatchSampler(stage_cases["liver"], "liver", data_config(), seed, -1.0)  # noqa: E731
    a, b, c = batches(make(0), 2), batches(make(0), 2), batches(make(1), 2)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_at_step_k_gives_the_batches_of_an_uninterrupted_run(stage_cases):
    sampler = pipeline.PatchSampler(stage_cases["liver"], "liver", data_config(), 0, -1.0)
    full = batches(sampler, 3)
    resumed = batches(sampler, 3, start_step=2)
    np.testing.assert_array_equal(resumed[0]["image"], full[2]["image"])


def test_processes_get_disjoint_shards_that_make_up_the_global_batch(stage_cases):
    sampler = pipeline.PatchSampler(stage_cases["liver"], "liver", data_config(), 0, -1.0)
    whole = batches(sampler, 2)
    parts = [batches(sampler, 2, process_index=p, process_count=2) for p in range(2)]
    for step in range(2):
        assert parts[0][step]["image"].shape[0] == 2
        assert not np.array_equal(parts[0][step]["image"], parts[1][step]["image"])
        joined = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
        np.testing.assert_array_equal(joined, whole[step]["image"])
    with pytest.raises(ValueError, match="does not divide by 3 processes"):
        pipeline.make_dataset(sampler, 4, 2, process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches(stage_cases):
    sampler = pipeline.PatchSampler(stage_cases["tumor"], "tumor", data_config(), 0, -1.0)
    serial = batches(sampler, 2)
    parallel = batches(sampler, 2, workers=2)
    for x, y in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_foreground_oversampling_and_small_volume_padding(stage_cases):
    # Tumour crops are smaller than this patch in-plane: patches are padded with the air value.
    config = data_config(patch_size=(16, 64, 64), foreground_fraction=1.0)
    config.augment.update(flips=False, rot90=False, intensity_scale=0.0, intensity_shift=0.0)
    cases = [c for c in stage_cases["tumor"] if len(c.foreground)]
    sampler = pipeline.PatchSampler(cases, "tumor", config, 0, -1.0)
    for i in range(8):
        example = sampler(i)
        assert example["image"].shape == (16, 64, 64, 1) and example["label"].shape == (16, 64, 64)
        assert example["label"].sum() > 0, "foreground_fraction=1 must centre every patch on tumour"
        assert set(np.unique(example["label"])) <= {0, 1}
    assert any(cases[0].shape[i] < config.patch_size[i] for i in range(3))
    assert (sampler(0)["image"] == -1.0).any()


def test_augmentation_moves_image_and_label_together():
    rng = np.random.default_rng(0)
    label = (rng.random((8, 16, 16)) < 0.3).astype(np.uint8)
    config = data_config().augment
    config.update(intensity_scale=0.0, intensity_shift=0.0)
    seen = set()
    for seed in range(12):
        image, target = pipeline.augment(label.astype(np.float32), label, np.random.default_rng(seed), config)
        np.testing.assert_array_equal(image, target)
        seen.add(target.tobytes())
    assert len(seen) > 4, "flips and rotations must actually change the patch"
    config.affine = True
    with pytest.raises(ValueError, match="affine=True is not implemented"):
        pipeline.augment(label.astype(np.float32), label, np.random.default_rng(0), config)


@pytest.mark.parametrize("device_augment", [False, True])
def test_batch_spec_from_the_config_alone_matches_the_batches(stage_cases, device_augment):
    # train compiles the step for batch_spec's shapes before any batch exists; a drift between the
    # two would only show as a type error at the first step.
    config = data_config()
    config.augment.device = device_augment
    sampler = pipeline.PatchSampler(stage_cases["liver"], "liver", config, 0, -1.0)
    batch = batches(sampler, 1)[0]
    spec = pipeline.batch_spec(config, 4)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
    assert (spec["image"].shape[1:4] != tuple(config.patch_size)) == device_augment  # the margin
