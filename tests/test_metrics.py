"""Metrics against medpy.metric.binary (test-only dependency), edge cases, lesions, tumour sizes."""

import math

import numpy as np
import pytest
from scipy import ndimage

from livseg_jax import metrics

mb = pytest.importorskip("medpy.metric.binary")
medpy_surface_distances = getattr(mb, "__surface_distances")  # module-private, not mangled

SPACINGS = [(0.7, 1.3, 2.5), (3.0, 0.8, 0.8)]


def _blob(rng, shape, fraction, sigma=2.0):
    """Returns a random smooth 3D blob mask covering about `fraction` of the volume."""
    x = ndimage.gaussian_filter(rng.random(shape), sigma)
    return x > np.quantile(x, 1.0 - fraction)


def _blob_pairs():
    """Yields (name, pred, truth): overlapping, border-touching, disjoint, nested blob pairs."""
    rng = np.random.default_rng(0)
    shape = (26, 30, 22)
    truth = _blob(rng, shape, 0.15)
    # Prediction = truth shifted, with random voxels flipped: partial overlap, ragged surfaces.
    pred = np.roll(truth, (2, -1, 1), axis=(0, 1, 2)) ^ (rng.random(shape) < 0.02)
    yield "overlapping", pred, truth
    # Large blobs fill the volume to its faces, exercising the array-border surface rule.
    yield "border", _blob(rng, shape, 0.6), _blob(rng, shape, 0.5)
    far_a = np.zeros(shape, bool)
    far_b = np.zeros(shape, bool)
    far_a[1:5, 2:6, 1:4] = True
    far_b[18:25, 20:28, 15:21] = _blob(rng, (7, 8, 6), 0.5, sigma=1.0)
    yield "disjoint", far_a, far_b
    inner = ndimage.binary_erosion(truth, iterations=1)
    yield "nested", inner, truth


PAIRS = list(_blob_pairs())


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name,pred,truth", PAIRS, ids=[p[0] for p in PAIRS])
def test_binary_metrics_match_medpy_on_random_blobs(name, pred, truth, spacing):
    row = metrics.binary_metrics(pred, truth, spacing)
    expected = {
        "dice": mb.dc(pred, truth),
        "iou": mb.jc(pred, truth),
        "precision": mb.precision(pred, truth),
        "recall": mb.recall(pred, truth),
        "rvd": mb.ravd(pred, truth),  # medpy's "ravd" is signed: (|A| - |B|) / |B|
        "asd": mb.assd(pred, truth, voxelspacing=spacing),
        "hd95": mb.hd95(pred, truth, voxelspacing=spacing),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(row[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
    assert row["n_pred"] == pred.sum() and row["n_truth"] == truth.sum()


@pytest.mark.parametrize("name,pred,truth", PAIRS, ids=[p[0] for p in PAIRS])
def test_directed_surface_distances_equal_medpys(name, pred, truth):
    spacing = SPACINGS[0]
    d_pred, d_truth = metrics.surface_distances(pred, truth, spacing)
    np.testing.assert_allclose(d_pred, medpy_surface_distances(pred, truth, spacing), rtol=1e-12)
    np.testing.assert_allclose(d_truth, medpy_surface_distances(truth, pred, spacing), rtol=1e-12)


def test_metrics_are_unchanged_by_embedding_in_a_larger_volume():
    _, pred, truth = PAIRS[0]
    big_p = np.zeros((70, 64, 50), bool)
    big_t = np.zeros_like(big_p)
    big_p[31:57, 9:39, 20:42] = pred
    big_t[31:57, 9:39, 20:42] = truth
    small = metrics.binary_metrics(pred, truth, SPACINGS[1])
    big = metrics.binary_metrics(big_p, big_t, SPACINGS[1])
    for key in metrics.METRIC_NAMES:
        np.testing.assert_allclose(big[key], small[key], rtol=1e-12, err_msg=key)


def test_empty_mask_cases_have_documented_values():
    empty = np.zeros((6, 6, 6), bool)
    cube = empty.copy()
    cube[1:4, 1:4, 1:4] = True
    sp = (1.0, 2.0, 3.0)

    both = metrics.binary_metrics(empty, empty, sp)
    assert {k: both[k] for k in metrics.METRIC_NAMES} == {
        "dice": 1.0,
        "iou": 1.0,
        "precision": 1.0,
        "recall": 1.0,
        "rvd": 0.0,
        "asd": 0.0,
        "hd95": 0.0,
    }
    missed = metrics.binary_metrics(empty, cube, sp)  # nothing predicted, tumour present
    assert (missed["dice"], missed["iou"], missed["recall"], missed["rvd"]) == (0, 0, 0, -1)
    assert all(math.isnan(missed[k]) for k in ("precision", "asd", "hd95"))
    spurious = metrics.binary_metrics(cube, empty, sp)  # prediction on a tumour-free case
    assert (spurious["dice"], spurious["iou"], spurious["precision"]) == (0, 0, 0)
    assert all(math.isnan(spurious[k]) for k in ("recall", "rvd", "asd", "hd95"))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.surface_distances(cube, empty, sp)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_one_empty_mask_overlap_values_agree_with_medpy_including_nan():
    empty = np.zeros((6, 6, 6), bool)
    cube = empty.copy()
    cube[1:4, 2:5, 1:3] = True
    medpy_fns = {"dice": mb.dc, "iou": mb.jc, "precision": mb.precision, "recall": mb.recall}
    for pred, truth in ((empty, cube), (cube, empty)):
        row = metrics.binary_metrics(pred, truth, None)
        for key, fn in medpy_fns.items():
            np.testing.assert_equal(row[key], float(fn(pred, truth)), err_msg=key)
    # medpy's ravd is defined for an empty prediction only (it raises for an empty truth).
    assert metrics.binary_metrics(empty, cube, None)["rvd"] == mb.ravd(empty, cube)


def test_summarize_skips_and_counts_undefined_values():
    rng = np.random.default_rng(1)
    pairs = [(_blob(rng, (12, 12, 10), 0.2), _blob(rng, (12, 12, 10), 0.2)) for _ in range(3)]
    empty = np.zeros((12, 12, 10), bool)
    pairs.append((empty, pairs[0][1]))  # a missed case: precision / asd / hd95 undefined
    rows = [metrics.binary_metrics(p, t, (1.0, 1.0, 2.0)) for p, t in pairs]
    summary = metrics.summarize(rows)
    assert summary["n_cases"] == 4
    asd = np.array([r["asd"] for r in rows[:3]])
    assert summary["asd"]["n"] == 3 and summary["asd"]["n_undefined"] == 1
    np.testing.assert_allclose(summary["asd"]["mean"], asd.mean(), rtol=1e-12)
    np.testing.assert_allclose(summary["asd"]["std"], asd.std(), rtol=1e-12)
    dice = np.array([r["dice"] for r in rows])
    assert summary["dice"]["n"] == 4 and summary["dice"]["n_undefined"] == 0
    np.testing.assert_allclose(summary["dice"]["mean"], dice.mean(), rtol=1e-12)
    assert not any(math.isnan(summary[k]["mean"]) for k in metrics.METRIC_NAMES)
    # Global Dice = Dice of all voxels of all cases at once, from rows or from the masks.
    all_p = np.concatenate([p for p, _ in pairs])
    all_t = np.concatenate([t for _, t in pairs])
    np.testing.assert_allclose(summary["global_dice"], mb.dc(all_p, all_t), rtol=1e-12)
    np.testing.assert_allclose(metrics.global_dice(pairs), mb.dc(all_p, all_t), rtol=1e-12)
    assert metrics.global_dice([(empty, empty)]) == 1.0
    only_nan = metrics.summarize([metrics.binary_metrics(empty, pairs[0][1], None)])
    assert only_nan["asd"]["n"] == 0 and math.isnan(only_nan["asd"]["mean"])


def test_bad_inputs_are_rejected_with_clear_errors():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="differs from truth shape"):
        metrics.binary_metrics(a, np.zeros((4, 4, 5), bool), None)
    with pytest.raises(ValueError, match="spacing"):
        metrics.binary_metrics(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="3D"):
        metrics.binary_metrics(a[0], a[0], None)


def _ball(shape, centre, radius_mm, spacing):
    grid = np.indices(shape).astype(float)
    d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True))
    return d2 <= radius_mm**2


def test_lesion_detection_counts_hits_misses_and_false_positives():
    shape, sp = (40, 40, 20), (1.0, 1.0, 2.0)
    t1, t2, t3 = (_ball(shape, c, 4.0, sp) for c in ((8, 8, 5), (30, 10, 10), (10, 30, 14)))
    truth = t1 | t2 | t3
    fp = _ball(shape, (30, 32, 5), 3.0, sp)
    pred = (t1 & (np.indices(shape)[0] <= 8)) | t2 | fp  # half of t1, all of t2, t3 missed
    res = metrics.lesion_detection(pred, truth, sp)
    assert (res["n_true"], res["n_hit"], res["n_missed"]) == (3, 2, 1)
    assert (res["n_pred"], res["n_false_positive"]) == (3, 1)
    fractions = sorted(les["overlap_fraction"] for les in res["true_lesions"])
    assert fractions[0] == 0.0 and 0.4 < fractions[1] < 0.7 and fractions[2] == 1.0
    vols = sorted(les["volume_mm3"] for les in res["true_lesions"])
    np.testing.assert_allclose(vols[0], t1.sum() * 2.0)
    # Requiring 70 % coverage turns the half-covered lesion into a miss.
    strict = metrics.lesion_detection(pred, truth, sp, min_overlap=0.7)
    assert (strict["n_hit"], strict["n_missed"]) == (1, 2)


def test_lesion_connectivity_decides_whether_corner_touching_cubes_are_one_lesion():
    truth = np.zeros((8, 8, 8), bool)
    truth[1:3, 1:3, 1:3] = True
    truth[3:5, 3:5, 3:5] = True  # touches the first cube at one corner only
    assert metrics.lesion_detection(truth, truth, None)["n_true"] == 1
    assert metrics.lesion_detection(truth, truth, None, connectivity=1)["n_true"] == 2


def test_major_axis_of_a_voxel_line_is_the_uniform_distribution_formula():
    n, s = 9, 0.75
    coords = np.stack([np.arange(n) * s, np.zeros(n), np.zeros(n)], axis=1)
    # Variance of n equally spaced points is s²(n² - 1)/12.
    expected = math.sqrt(20.0 * s**2 * (n**2 - 1) / 12.0)
    np.testing.assert_allclose(metrics.major_axis_length(coords), expected, rtol=1e-12)
    assert metrics.major_axis_length(coords[:1]) == 0.0


def test_major_axis_of_an_anisotropic_ellipsoid_is_its_full_length():
    sp = (0.8, 0.8, 2.0)
    shape = (30, 56, 16)
    g = np.indices(shape).astype(float)
    c = np.array(shape) / 2.0
    # Semi-axes 20 mm along axis 1 (the major one), 10 mm and 12 mm on the others.
    inside = (
        ((g[0] - c[0]) * sp[0] / 10.0) ** 2
        + ((g[1] - c[1]) * sp[1] / 20.0) ** 2
        + ((g[2] - c[2]) * sp[2] / 12.0) ** 2
    ) <= 1.0
    res = metrics.lesion_detection(inside, inside, sp)
    np.testing.assert_allclose(res["true_lesions"][0]["major_axis_mm"], 40.0, rtol=0.03)


def format_tumor_size_table(study: dict) -> str:
    """Returns the tumour-size study as a small Markdown table (one line per Dice group)."""
    lines = [
        "| group | cases | tumours | mean major axis (mm) |",
        "|---|---|---|---|",
    ]
    for name, g in study["groups"].items():
        lines.append(
            f"| {name} | {g['n_cases']} | {g['n_tumors']} | "
            f"{g['mean_major_axis_mm']:.2f} ± {g['std_major_axis_mm']:.2f} |"
        )
    return "\n".join(lines)


def test_tumor_size_study_groups_cases_by_tumour_dice():
    shape, sp = (30, 30, 16), (1.0, 1.0, 2.0)
    big = _ball(shape, (15, 15, 8), 8.0, sp)
    small_a = _ball(shape, (6, 6, 4), 2.0, sp)
    small_b = _ball(shape, (24, 24, 12), 3.0, sp)
    empty = np.zeros(shape, bool)
    cases = [
        ("good", big, big, sp),  # Dice 1
        ("bad", empty, small_a | small_b, sp),  # Dice 0, two tumours
        ("healthy", empty, empty, sp),  # no tumour: left out of both groups
    ]
    study = metrics.tumor_size_study(iter(cases))
    axis = {r["case_id"]: r["mean_major_axis_mm"] for r in study["rows"]}
    lesions = metrics.lesion_detection(small_a | small_b, small_a | small_b, sp)["true_lesions"]
    np.testing.assert_allclose(axis["bad"], np.mean([les["major_axis_mm"] for les in lesions]))
    assert math.isnan(axis["healthy"])
    good, bad = study["groups"]["dice>=0.6"], study["groups"]["dice<0.6"]
    assert (good["n_cases"], good["n_tumors"], bad["n_cases"], bad["n_tumors"]) == (1, 1, 1, 2)
    np.testing.assert_allclose(good["mean_major_axis_mm"], axis["good"])
    np.testing.assert_allclose(bad["mean_major_axis_mm"], axis["bad"])
    assert axis["good"] > 2 * axis["bad"] and study["n_cases_without_tumor"] == 1
    table = format_tumor_size_table(study)
    assert "dice>=0.6 | 1 | 1 |" in table and "dice<0.6 | 1 | 2 |" in table
