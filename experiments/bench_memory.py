"""Peak host memory of predicting one large CT (issue 24: 512x512x1000 on a 24 GiB host).

    python -m experiments.bench_memory [--shape 512,512,1000] [--input volume.nii.gz]

Predicts one synthetic CT (written first, or `--input`) through the product path
(`inference.folder.predict_cases`: read, preprocess, both stages' sliding windows and blending,
largest component, restore, write) with threshold "networks" (foreground where the scaled
intensity is above a level): every host array of a real prediction is made, at its real size, but
no network runs, so the measurement takes a minute on a CPU. A real network adds its activations
(device memory on a GPU; on XLA:CPU host memory, a few windows' worth). The timings record's
`memory` (peak RSS of the case, `VmHWM` reset when the case starts) and the process's baseline
before the case go into the result file.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

from experiments.bench_common import environment, write_result


def threshold_stage(name: str, level: float, window):
    """Returns a StageModel whose "network" is foreground where the scaled intensity exceeds `level`."""
    import jax.numpy as jnp

    from livseg_jax.config import base_config
    from livseg_jax.data.preprocess import PreprocessSettings
    from livseg_jax.inference.two_stage import StageModel

    def window_fn(variables, x):
        del variables
        p = (x > level).astype(jnp.float32)
        return jnp.concatenate([1 - p, p], axis=-1)

    return StageModel(stage=name, window_fn=window_fn, variables=None, num_classes=2, window=tuple(window),
                      preprocessing=PreprocessSettings.from_config(base_config().preprocess), overlap=0.5,
                      batch_size=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,512,1000", help="raw CT size x,y,z (when no --input)")
    parser.add_argument("--input", help="an existing CT .nii.gz instead of a new phantom")
    parser.add_argument("--window", default="48,256,256", help="sliding window of both stages")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    from livseg_jax.data.synthetic import make_phantom, write_phantom
    from livseg_jax.inference.folder import Job, predict_cases
    from livseg_jax.inference.memory import memory_record
    from livseg_jax.inference.two_stage import Predictor

    tmp = pathlib.Path(tempfile.mkdtemp())
    if args.input:
        source = pathlib.Path(args.input)
    else:
        shape = tuple(int(v) for v in args.shape.split(","))
        spacing = (0.75, 0.75, 1.0)
        start = time.perf_counter()
        hu, labels = make_phantom(shape, spacing, seed=0)
        write_phantom(hu, labels, spacing, tmp / "volume-0.nii.gz", tmp / "segmentation-0.nii.gz")
        del hu, labels
        print(f"phantom {shape} written in {time.perf_counter() - start:.1f} s", flush=True)
        source = tmp / "volume-0.nii.gz"
    window = tuple(int(v) for v in args.window.split(","))
    # Soft tissue (scaled intensity > 0.2, about 40 HU) as "liver": most of the body, the worst case.
    predictor = Predictor(threshold_stage("liver", 0.2, window), threshold_stage("tumor", 0.6, window))
    baseline = memory_record()
    outcomes = predict_cases([predictor], [Job("large", source, tmp / "large_seg.nii.gz")], lambda outcome: None)
    if outcomes[0].error is not None:
        raise SystemExit(f"prediction failed: {outcomes[0].error!r}")
    record = outcomes[0].record
    payload = {"benchmark": "memory", "input": str(source), "disk_shape": record["disk_shape"],
               "preprocessed_shape": record["preprocessed_shape"], "window": window,
               "baseline_before_case": baseline, "memory": record["memory"], "timings_s": record["timings_s"],
               "liver_windows": record["liver_windows"], "tumor_windows": record["tumor_windows"],
               "environment": environment()}
    print(f"baseline {baseline}\ncase {record['memory']}\ntimings {record['timings_s']}", flush=True)
    print(f"wrote {write_result('bench_memory' + (f'_{args.tag}' if args.tag else ''), payload)}")


if __name__ == "__main__":
    main()
