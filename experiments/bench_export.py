"""Exported deploy networks against JAX: agreement and time per batch of windows.

    python -m experiments.bench_export [--variant elanres_msca_unet] [--features 32,64,128,256,320]
                                       [--window 96,160,160] [--batch 2] [--repeats 5]
    python -m experiments.bench_export --tiny     # CPU smoke check: features (4, 8), 16^3 windows

A random training-form network (non-trivial BatchNorm statistics) is re-parameterised and run on
one batch of N(0, 1) windows by: the jitted JAX deploy forward, the StableHLO artefact reloaded
with `jax.export.deserialize` (`convert --to-stablehlo`), and ONNX Runtime on every provider it
has here (`convert --to-onnx`; CUDAExecutionProvider needs the onnxruntime-gpu wheel). Reports the
max relative difference of the logits to JAX and the median time per batch (compilation and
session creation excluded, reported apart). Writes experiments/results/bench_export.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from experiments.bench_common import environment, median_time, print_result, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="elanres_msca_unet")
    p.add_argument("--features", default="32,64,128,256,320")
    p.add_argument("--window", default="96,160,160")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="features (4, 8), 16^3 windows, 2 repeats")
    args = p.parse_args()
    if args.tiny:
        args.features, args.window, args.repeats = "4,8", "16,16,16", 2

    import jax
    import onnxruntime as ort

    from livseg_jax.config import model_config
    from livseg_jax.interop import mapping, onnx_export, stablehlo_export
    from livseg_jax.models import build_model, reparameterize
    from tools import parity

    cfg = model_config(args.variant)
    cfg.features = tuple(int(f) for f in args.features.split(","))
    window = tuple(int(w) for w in args.window.split(","))
    variables = reparameterize(parity.random_flax_variables(mapping.flax_variable_shapes(cfg, deploy=False), 0))
    x = np.random.default_rng(0).normal(size=(args.batch, *window, 1)).astype(np.float32)
    model = build_model(cfg, deploy=True)
    device_vars = jax.device_put(variables)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False).astype(np.float32))
    start = time.perf_counter()
    reference = np.asarray(forward(device_vars, x))
    rows = {"jax": {"first_call_s": time.perf_counter() - start}}
    x_dev = jax.device_put(x)
    rows["jax"].update(median_time(lambda: forward(device_vars, x_dev).block_until_ready(), lambda: None,
                                   1, args.repeats))

    def rel(out) -> float:
        return float(np.abs(np.asarray(out, np.float64) - reference).max() / np.abs(reference).max())

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        platform = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
        stablehlo_export.export_stablehlo(variables, cfg, window, f"{tmp}/m.stablehlo", platforms=(platform,))
        export_s = time.perf_counter() - start
        exported = jax.export.deserialize(open(f"{tmp}/m.stablehlo", "rb").read())
        start = time.perf_counter()
        out = exported.call(x_dev)
        rows["stablehlo"] = {"export_s": export_s, "first_call_s": time.perf_counter() - start, "rel": rel(out)}
        rows["stablehlo"].update(median_time(lambda: exported.call(x_dev).block_until_ready(), lambda: None,
                                             1, args.repeats))

        start = time.perf_counter()
        onnx_export.export_onnx(variables, cfg, window, f"{tmp}/m.onnx")
        export_s = time.perf_counter() - start
        for provider in [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]:
            start = time.perf_counter()
            session = ort.InferenceSession(f"{tmp}/m.onnx", providers=[provider])
            out = session.run(None, {"image": x})[0]
            row = {"export_s": export_s, "first_call_s": time.perf_counter() - start, "rel": rel(out),
                   "providers": session.get_providers()}
            row.update(median_time(lambda s=session: s.run(None, {"image": x}), lambda: None, 1, args.repeats))
            rows[f"onnxruntime[{provider}]"] = row
    payload = {"variant": args.variant, "features": list(cfg.features), "window": list(window),
               "batch": args.batch, "environment": environment(), "backends": rows}
    for name, row in rows.items():
        print_result({"backend": name, **{k: v for k, v in row.items() if k != "times_ms"}})
    if not args.tiny:
        write_result("bench_export", payload)


if __name__ == "__main__":
    main()
