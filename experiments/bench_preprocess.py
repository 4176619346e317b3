"""Time of the CPU preprocessing of a LiTS-sized CT (512x512x400, 0.75x0.75x1 mm synthetic phantom)
and of the body-mask steps it replaced: scipy's binary opening against the separable in-plane
opening, and `np.bincount` component sizes against counting inside each component's box; and
stage 1's largest component of a speckled mask with and without finding every component's box.

    python -m experiments.bench_preprocess [--shape 512,512,400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from experiments.bench_common import environment, write_result


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,512,400", help="raw x,y,z")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from scipy import ndimage

    from livseg_jax.config import base_config
    from livseg_jax.data import preprocess as pp
    from livseg_jax.data.regions import component_sizes, largest_component
    from livseg_jax.data.synthetic import make_phantom

    shape = tuple(int(v) for v in args.shape.split(","))
    hu, _ = make_phantom(shape, (0.75, 0.75, 1.0), seed=0)
    image = np.ascontiguousarray(hu.transpose(2, 1, 0))  # internal (D, H, W)
    config = base_config().preprocess
    threshold = float(config.body_threshold_hu)
    pp.preprocess(image, (1.0, 0.75, 0.75), config)  # warm-up (page faults, caches)
    mask = image[:, ::2, ::2] > threshold  # what body_bbox works on
    opened = pp._open_inplane(mask)
    labels, n = ndimage.label(opened)
    boxes = ndimage.find_objects(labels)
    rows = {
        "preprocess_total_s": median_seconds(lambda: pp.preprocess(image, (1.0, 0.75, 0.75), config), args.repeats),
        "opening_scipy_s": median_seconds(
            lambda: ndimage.binary_opening(mask, structure=np.ones((1, 3, 3), bool)), args.repeats),
        "opening_separable_s": median_seconds(lambda: pp._open_inplane(mask), args.repeats),
        "sizes_bincount_s": median_seconds(lambda: np.bincount(labels.ravel()), args.repeats),
        "sizes_per_box_s": median_seconds(lambda: component_sizes(labels, boxes, n), args.repeats),
    }
    # Stage 1's largest component of a speckled mask (an untrained or unsure liver model): the
    # old path found every component's box first, the new one only when there are few.
    speckled = np.zeros((400, 169, 232), bool)  # the preprocessed grid of the inference benchmark
    speckled[20:380, 20:150, 20:210] = True
    speckled |= np.random.default_rng(0).random(speckled.shape) < 0.02
    s_labels, s_n = ndimage.label(speckled)
    rows["largest_component_speckled_s"] = median_seconds(lambda: largest_component(speckled), args.repeats)
    rows["largest_component_speckled_with_boxes_s"] = median_seconds(
        lambda: ndimage.label(speckled)[0] == int(np.argmax(
            component_sizes(s_labels, ndimage.find_objects(s_labels), s_n))), args.repeats)
    payload = {"benchmark": "preprocess", "raw_shape": shape, "internal_shape": list(image.shape),
               "body_mask_grid": list(mask.shape), "components": int(n), "speckled_components": int(s_n),
               "repeats": args.repeats,
               "environment": environment(), **rows}
    print("| step | seconds |\n|---|---:|")
    for key, value in rows.items():
        print(f"| {key} | {value:.3f} |")
    print(f"wrote {write_result('bench_preprocess', payload)}")


if __name__ == "__main__":
    main()
