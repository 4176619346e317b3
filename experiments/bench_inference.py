"""End-to-end two-stage prediction of a LiTS-sized synthetic CT (512x512x400 raw): read,
preprocess, both stages, restore, write; time per phase. Deploy vs training-form model, and the
JAX window predictor against the PyTorch twin at the same sliding-window settings.

    python -m experiments.bench_inference [--shape 512,512,400] [--variant elanres_msca_unet]

`--host-phases` replaces both networks by intensity thresholds (liver: the whole body, as the
biased liver head below gives; tumour: bright voxels), so that the host phases of one case (read,
preprocess, restore, write) are timed through the same `Predictor.predict_file` on a machine
without an accelerator (the sliding windows then run on XLA:CPU and their times mean nothing):

    python -m experiments.bench_inference --host-phases --shape 512,512,400 --repeats 3 --tag cpu_host_phases

The stage models have random weights, with the liver head biased to foreground everywhere: stage 1
then keeps the whole body and stage 2 runs on all of it, the slowest case (a trained liver model
crops stage 2 to the liver). Timings exclude compilation (`Predictor.warmup`), which is reported.
Each row also holds the case's peak host RSS and device memory (`inference/memory.py`; the
largest of the repeats).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from experiments.bench_common import (
    apply_overrides,
    enable_compilation_cache,
    environment,
    int_tuple,
    parse_overrides,
    write_result,
)


def make_stage_dir(root: pathlib.Path, stage: str, variant: str, window, features, dtype: str,
                   force_foreground: bool, overrides: dict[str, str]) -> pathlib.Path:
    """Writes random-weight variables for one stage as a run directory; returns the dir."""
    import jax

    from livseg_jax.config import base_config
    from livseg_jax.models import build_model, init_variables
    from livseg_jax.run_dir import write_variables

    config = base_config()
    config.stage = stage
    config.model.name = variant
    config.model.features = tuple(features)
    config.model.dtype = dtype
    apply_overrides(config.model, overrides)
    config.data.patch_size = tuple(window)
    config.inference.batch_size = 2
    variables = jax.device_get(init_variables(build_model(config.model), jax.random.key(0), (16, 32, 32)))
    if force_foreground:
        head = max((k for k in variables["params"] if k.startswith("head")), key=lambda k: int(k[4:] or 0))
        variables["params"][head]["bias"] = np.array([-20.0, 20.0], np.float32)  # the full-resolution head
    return write_variables(root / stage, variables, config)


def make_stage_dirs(root: pathlib.Path, variant: str, liver_window, tumor_window, features, dtype: str,
                    overrides: dict) -> tuple[pathlib.Path, pathlib.Path]:
    """Returns the liver and tumour run directories of the benchmark networks (`make_stage_dir`)."""
    return (make_stage_dir(root, "liver", variant, liver_window, features, dtype, True, overrides),
            make_stage_dir(root, "tumor", variant, tumor_window, features, dtype, False, overrides))


def torch_window_times(variant, features, window, image, overlap, batch, device: str = "cuda") -> dict:
    """Seconds for the PyTorch twin (eval, deploy form, bf16 autocast) over the same sliding
    windows, blended on the GPU (`torch_sliding_window`)."""
    import torch

    from experiments.torch_sliding_window import torch_sliding_window
    from livseg_jax.config import model_config
    from livseg_jax.interop.torch_models import reparameterize_torch, torch_model_from_config

    cfg = model_config(variant)
    cfg.features = tuple(features)
    model = reparameterize_torch(torch_model_from_config(cfg).to(device).eval()).to(device).eval()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def on_device(t):  # (N, 1, D, H, W) on the device -> probabilities (N, K, D, H, W)
        with torch.autocast(device, dtype=torch.bfloat16):
            return torch.softmax(model(t).float(), 1)

    runs = {"device_blend_s": lambda: torch_sliding_window(image, on_device, window, overlap, batch,
                                                           device=device)}
    times = {}
    for name, run in runs.items():
        run()  # warm-up on the full volume (cuDNN algorithm choice, allocator)
        times[name] = best_of(run, sync)
    return times


def best_of(run, sync, repeats: int = 3) -> float:
    """Fastest of `repeats` synchronised runs, in seconds."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def host_phase_row(path: pathlib.Path, liver_window, tumor_window, repeats: int) -> dict:
    """Returns the timings of the fastest of `repeats` `predict_file` runs (after one untimed run)
    with threshold stand-ins for the networks (`bench_memory.threshold_stage`), and the case's
    memory: the host phases as a network run has them."""
    from experiments.bench_memory import threshold_stage
    from livseg_jax.inference.two_stage import Predictor

    predictor = Predictor(threshold_stage("liver", -2.0, liver_window),  # scaled HU >= -1: all body
                          threshold_stage("tumor", 0.6, tumor_window))
    out = path.with_name("pred.nii.gz")
    predictor.predict_file(path, out)  # compiles the blending programs
    runs = []
    for _ in range(repeats):
        rss_before = _rss_gib()
        _, record = predictor.predict_file(path, out)
        runs.append({**record, "host_rss_before_case_gib": rss_before})
        print({k: round(v, 3) for k, v in record["timings_s"].items()}, flush=True)
    best = min(runs, key=lambda r: r["timings_s"]["total"])
    host = ("read", "preprocess", "restore", "write")
    return {"timings_s": best["timings_s"], "host_phases_s": round(sum(best["timings_s"].get(k, 0.0) for k in host), 4),
            "per_phase_min_s": {k: min(r["timings_s"][k] for r in runs) for k in best["timings_s"]},
            "memory": best["memory"], "host_rss_before_case_gib": best["host_rss_before_case_gib"],
            "preprocessed_shape": best.get("preprocessed_shape"), "tumor_windows": best.get("tumor_windows")}


def _rss_gib() -> float | None:
    """Returns the process's resident set now in GiB (None without /proc)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / (1 << 20), 3)
    except OSError:
        return None
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512,512,400", help="raw CT size x,y,z")
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--features", default="16,32,64,128,256")
    parser.add_argument("--liver-window", default="48,256,256")
    parser.add_argument("--tumor-window", default="48,128,128")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch twin's windows")
    parser.add_argument("--overrides", default="", help="model config overrides of both stages, "
                        "e.g. depthwise_impl=shift,pointwise_impl=einsum,dense_pack_channels=32")
    parser.add_argument("--windows-only", action="store_true",
                        help="skip the end-to-end rows: only the liver-stage window timings (with --torch)")
    parser.add_argument("--forms", default="deploy,training",
                        help="model forms to time end to end: deploy (re-parameterised), training")
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs per form (the fastest is kept)")
    parser.add_argument("--host-phases", action="store_true",
                        help="threshold stand-ins for both networks: time the host phases on any machine")
    parser.add_argument("--batch-sizes", default="2",
                        help="windows per network call to time end to end, e.g. 2,4,8 (a row each)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if not forms or set(forms) - {"deploy", "training"} or args.repeats < 1:
        parser.error("--forms takes deploy and/or training; --repeats must be >= 1")
    if args.windows_only and not args.torch:
        parser.error("--windows-only times the JAX and PyTorch windows: add --torch")
    overrides = parse_overrides(args.overrides)
    enable_compilation_cache()
    from livseg_jax.data.synthetic import make_phantom, write_phantom
    from livseg_jax.inference.two_stage import Predictor

    shape = int_tuple(args.shape)
    features = int_tuple(args.features)
    liver_window = int_tuple(args.liver_window)
    tumor_window = int_tuple(args.tumor_window)
    spacing = (0.75, 0.75, 1.0)
    tmp = pathlib.Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    hu, labels = make_phantom(shape, spacing, seed=0)
    write_phantom(hu, labels, spacing, tmp / "volume-0.nii.gz", tmp / "segmentation-0.nii.gz")
    del hu, labels  # not part of any case's memory
    print(f"phantom {shape} written in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.host_phases:
        payload = {"benchmark": "inference_host_phases", "raw_shape": shape, "spacing_mm": spacing,
                   "liver_window": liver_window, "tumor_window": tumor_window, "environment": environment(),
                   "rows": [host_phase_row(tmp / "volume-0.nii.gz", liver_window, tumor_window, args.repeats)]}
        print(f"wrote {write_result('bench_inference' + (f'_{args.tag}' if args.tag else ''), payload)}")
        return
    models = tmp / "models"
    liver_dir, tumor_dir = make_stage_dirs(models, args.variant, liver_window, tumor_window, features, args.dtype,
                                           overrides)

    rows = []
    settings = [(form == "deploy", b) for form in forms for b in int_tuple(args.batch_sizes)]
    for deploy, batch_size in () if args.windows_only else settings:
        predictor = Predictor.from_checkpoints(liver_dir, tumor_dir, deploy=deploy, batch_size=batch_size)
        compile_s = predictor.warmup()
        runs = []
        for i in range(args.repeats):
            out = tmp / f"pred-{int(deploy)}-{i}.nii.gz"
            rss_before = _rss_gib()
            _, record = predictor.predict_file(tmp / "volume-0.nii.gz", out)
            runs.append({**record, "memory": {**record["memory"], "host_rss_before_case_gib": rss_before}})
        best = min(runs, key=lambda r: r["timings_s"]["total"])
        rows.append({"deploy": deploy, "batch_size": batch_size, "compile_s": compile_s, "timings_s": best["timings_s"],
                     "liver_windows": best.get("liver_windows"), "tumor_windows": best.get("tumor_windows"),
                     "preprocessed_shape": best.get("preprocessed_shape"),
                     "memory": max((r["memory"] for r in runs), key=lambda m: m["host_peak_rss_gib"])})
        print(f"deploy={deploy} batch {batch_size}: total {best['timings_s']['total']:.2f} s  {best['timings_s']}  "
              f"memory {rows[-1]['memory']}", flush=True)

    torch_row = None
    if args.torch:
        from livseg_jax.data import nifti
        from livseg_jax.data.preprocess import preprocess
        from livseg_jax.inference.sliding_window import sliding_window
        from livseg_jax.inference.two_stage import load_stage_model

        image, geometry = nifti.read_image(tmp / "volume-0.nii.gz")
        stage = load_stage_model(liver_dir, "liver", deploy=True)
        pre, _, _ = preprocess(image, geometry.spacing, stage.preprocessing)
        # Warm-ups on the full volume: the timed runs below include no compilation.
        sliding_window(pre, stage.window_fn, stage.variables, liver_window, stage.overlap,
                       stage.batch_size, num_classes=stage.num_classes)
        # It returns a host array, so each run ends synchronised.
        jax_device_s = best_of(lambda: sliding_window(pre, stage.window_fn, stage.variables, liver_window,
                                                      stage.overlap, stage.batch_size,
                                                      num_classes=stage.num_classes), lambda: None)
        torch_s = torch_window_times(args.variant, features, liver_window, pre, stage.overlap,
                                     stage.batch_size)
        torch_row = {"liver_stage_windows_jax_device_blend_s": jax_device_s,
                     "liver_stage_windows_torch_device_blend_s": torch_s["device_blend_s"],
                     "preprocessed_shape": list(pre.shape)}
        print(f"liver-stage sliding window, blended on the device: JAX {jax_device_s:.2f} s, "
              f"PyTorch {torch_s['device_blend_s']:.2f} s", flush=True)

    payload = {"benchmark": "inference", "raw_shape": shape, "spacing_mm": spacing, "overrides": overrides,
               "variant": args.variant, "features": features, "dtype": args.dtype,
               "liver_window": liver_window, "tumor_window": tumor_window, "environment": environment(),
               "rows": rows, "torch": torch_row}
    print(f"wrote {write_result('bench_inference' + (f'_{args.tag}' if args.tag else ''), payload)}")


if __name__ == "__main__":
    main()
