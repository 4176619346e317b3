"""Training-mode BatchNorm, forward and backward, per form and map shape (issue 21 target 4).

Times `y = relu(BatchNorm(x))` and its gradient with respect to the input, scale and bias, for each
form of `livseg_jax.models.batch_norm` ("flax", the reference; "two_stage"), on the map shapes of the
paper's network at a 48x256x256 patch and batch 2 (the full-resolution maps have 8 and 16 channels),
back to back. Bytes moved at least: the input read twice and written once forward, and the input and
output gradient read and the input gradient written backward; the table gives the bandwidth that
implies.

    python -m experiments.bench_batch_norm --tag h200 [--dtype bfloat16] [--steps 50]

Writes experiments/results/bench_batch_norm_<tag>.json and prints a table.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_common import back_to_back_ms, environment, write_result
from livseg_jax.models.batch_norm import IMPLS, TwoStageBatchNorm

# (B, D, H, W, C) of the paper network's BatchNorm inputs at a 48x256x256 patch and batch 2.
SHAPES = ((2, 48, 256, 256, 8), (2, 48, 256, 256, 16), (2, 24, 128, 128, 32), (2, 12, 64, 64, 64),
          (2, 6, 32, 32, 128))


def make_module(impl: str, dtype) -> nn.Module:
    if impl == "flax":
        return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return TwoStageBatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)


def time_form(impl: str, shape, dtype, steps: int) -> dict:
    module = make_module(impl, dtype)
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
    g = jax.random.normal(jax.random.key(1), shape, jnp.float32).astype(dtype)
    variables = module.init(jax.random.key(2), x)

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        return jnp.sum((nn.relu(y) * g).astype(jnp.float32)), updates

    step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    out = step(variables["params"], x)
    jax.block_until_ready(out)
    timing = back_to_back_ms(lambda: step(variables["params"], x),
                             lambda: jax.block_until_ready(step(variables["params"], x)), steps)
    nbytes = np.dtype(dtype).itemsize * int(np.prod(shape))
    moved = 6 * nbytes  # forward: read x twice, write y; backward: read x and dy, write dx
    return {"impl": impl, "shape": list(shape), **timing,
            "gbytes_per_s": moved / (timing["back_to_back_ms"] * 1e-3) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    rows = []
    print(f"{'shape':>24} {'impl':>10} {'ms':>8} {'GB/s':>8}")
    for shape in SHAPES:
        for impl in IMPLS:
            row = time_form(impl, shape, dtype, args.steps)
            rows.append(row)
            print(f"{str(tuple(shape)):>24} {impl:>10} {row['back_to_back_ms']:8.3f} {row['gbytes_per_s']:8.0f}",
                  flush=True)
    write_result(f"bench_batch_norm_{args.tag}", {"benchmark": "bench_batch_norm", "dtype": args.dtype,
                                                 "steps": args.steps, "environment": environment(),
                                                 "rows": rows})


if __name__ == "__main__":
    main()
