"""Minimal reproducer of the bf16 NaN: the kernel gradient of one 1x1 convolution (issue 21).

`experiments.bf16_nan` tied the NaN of `elanres_msca_unet` (bf16, conv 1x1s) to the kernels
`msca1/proj_in` and `msca1/fc1`, whose gradients XLA computes with `__cudnn$convBackwardFilter`
(cuDNN engine 62, legacy API, workspace 0.5-2 MB). This program holds only that computation:
x (48, 128, 128, C_in) and dy (48, 128, 128, C_out) in bf16, NHWC, a 1x1 kernel in OHWI; it
computes dW many times from the same inputs and reports how often the result is non-finite,
how many distinct results it gets, its error against a float32 einsum, and the algorithm XLA
compiled (read from the optimised HLO).

    python -m experiments.bf16_nan_repro --tag h200 [--autotune FILE(.gz)] [--repeats 50]

`--autotune` loads autotuning results (`--xla_gpu_load_autotune_results_from`) so the program
gets the algorithm the train step got (the file from `experiments.bf16_nan`'s dump).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import sys
import tempfile


def _set_autotune_flags(path: str) -> str:
    """Sets XLA_FLAGS to load autotuning results from `path` (gunzipped first); returns the file used."""
    if path.endswith(".gz"):
        plain = os.path.join(tempfile.mkdtemp(), "autotune.textproto")
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path = plain
    flag = f"--xla_gpu_load_autotune_results_from={path}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", default="local")
    parser.add_argument("--autotune", default="")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--shape", default="48,128,128", help="N,H,W of the activations")
    args = parser.parse_args()
    if args.autotune:
        _set_autotune_flags(args.autotune)
    import jax  # after XLA_FLAGS is final
    import jax.numpy as jnp
    import numpy as np

    from experiments.bench_common import environment, write_result

    n, h, w = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    rows = []
    for name, c_in, c_out in (("proj_in", 32, 32), ("fc1", 32, 128)):
        x = jnp.asarray(rng.normal(size=(n, h, w, c_in)).astype(np.float32))
        dy = jnp.asarray((rng.normal(size=(n, h, w, c_out)) * 1e-3).astype(np.float32))

        def kernel_grad(x, dy, c_out=c_out):
            w0 = jnp.zeros((c_out, 1, 1, x.shape[-1]), x.dtype)
            conv = lambda k: jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",  # noqa: E731
                                                          dimension_numbers=("NHWC", "OHWI", "NHWC"))
            return jax.vjp(conv, w0)[1](dy)[0]

        xb, dyb = x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16)
        compiled = jax.jit(kernel_grad).lower(xb, dyb).compile()
        hlo = compiled.as_text()
        custom = [line.strip()[:600] for line in hlo.splitlines() if "__cudnn$conv" in line]
        algos = [m.group(0) for line in custom for m in [re.search(r'"algorithm":\{[^}]*\}[^}]*\}', line)] if m]
        ref = np.einsum("nhwi,nhwo->oi", np.asarray(xb, np.float32), np.asarray(dyb, np.float32))
        nonfinite, digests, errors = 0, set(), []
        for _ in range(args.repeats):
            out = np.asarray(compiled(xb, dyb), np.float32)[:, 0, 0, :]
            if not np.all(np.isfinite(out)):
                nonfinite += 1
            digests.add(hashlib.sha1(out.tobytes()).hexdigest())
            errors.append(float(np.nanmax(np.abs(out - ref)) / np.max(np.abs(ref))))
        row = {"conv": name, "x": [n, h, w, c_in], "dy": [n, h, w, c_out], "repeats": args.repeats,
               "non_finite_results": nonfinite, "distinct_results": len(digests),
               "max_rel_error_vs_f32": max(errors), "cudnn_calls": custom, "algorithms": algos}
        print(f"{name}: {nonfinite}/{args.repeats} non-finite, {len(digests)} distinct result(s), "
              f"max rel error {max(errors):.2e}; algorithm {algos}", flush=True)
        rows.append(row)
    result = {"environment": environment(), "args": vars(args), "rows": rows}
    print("wrote", write_result(f"bf16_nan_repro_{args.tag}", result))


if __name__ == "__main__":
    sys.exit(main())
