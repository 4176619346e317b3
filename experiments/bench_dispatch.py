"""The host's cost of passing the train state through a compiled program: the state's arrays as they
are, against the same numbers packed into one array per dtype (issue 21, targets 3 and 4).

A train step takes the state and returns the next one: the paper network's state is ~1,400 arrays
(parameters, BatchNorm statistics, Adam's two moments), so every step hands ~2,800 arrays through
JAX's dispatch and XLA's runtime. Session 13 found that dispatching the paper step without waiting
took ~29 ms of its ~40 ms on an H200 host. This measures the share of that which is the arrays'
number alone, with programs that do no work worth timing on the device:

- `identity`: the state in, the state out (donated, so outputs alias inputs);
- `add_one`: every array plus one (one small kernel per array or fused group);
- `identity_packed`, `add_one_packed`: the same on the state packed into one array per dtype.

For each it records the time per call when 50 calls are dispatched without waiting (`dispatch_ms`)
and back to back with one wait at the end (`back_to_back_ms`).

    python -m experiments.bench_dispatch --config configs/liver.py:paper --tag h200
"""

from __future__ import annotations

import argparse
import time

from experiments.bench_common import REPO, back_to_back_ms, environment, stage_step_parts, write_result

VARIANTS = ("identity", "identity_packed", "add_one", "add_one_packed")


def packed_like(leaves) -> list:
    """One zero array per dtype, as long as all of `leaves` of that dtype together."""
    import jax.numpy as jnp

    sizes: dict = {}
    for leaf in leaves:
        sizes[leaf.dtype] = sizes.get(leaf.dtype, 0) + leaf.size
    return [jnp.zeros((size,), dtype) for dtype, size in sizes.items()]


def measure(config_arg: str, variant: str, calls: int) -> dict:
    import jax
    import jax.numpy as jnp

    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.state import create_train_state

    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    _, _, model, optimizer, _, _ = stage_step_parts(config, "16,32,32")
    shapes = jax.eval_shape(lambda: create_train_state(model, optimizer, config.seed))
    leaves = [jnp.zeros(s.shape, s.dtype) for s in jax.tree.leaves(shapes)]
    arrays = packed_like(leaves) if variant.endswith("_packed") else leaves
    body = (lambda xs: xs) if variant.startswith("identity") else (lambda xs: [x + 1 for x in xs])
    program = jax.jit(body, donate_argnums=0)
    state = {"arrays": program(arrays)}
    jax.block_until_ready(state["arrays"])

    def step():
        state["arrays"] = program(state["arrays"])

    sync = lambda: jax.block_until_ready(state["arrays"])  # noqa: E731
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    dispatch_ms = (time.perf_counter() - start) * 1e3 / calls
    sync()
    return {"variant": variant, "arrays_in": len(arrays), "state_arrays": len(leaves),
            "dispatch_ms": round(dispatch_ms, 3), **back_to_back_ms(step, sync, calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--tag", default="local")
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {VARIANTS}")
        row = measure(args.config, variant, args.calls)
        print(row, flush=True)
        rows.append(row)
    path = write_result(f"bench_dispatch_{args.tag}", {"benchmark": "bench_dispatch", "config": args.config,
                                                      "environment": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
