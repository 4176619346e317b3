"""Tracing and lowering the train step's gradient program, with and without Flax's own parameter check.

On the first step's critical path, before XLA starts, Python traces and lowers the step. Flax checks
each existing parameter's shape when a model is applied by tracing the parameter's initialiser;
`livseg_jax.models.params.QuickParamCheck` gives that check zeros of the shape instead. Variants,
each in a fresh process (JAX caches traces), in the given order:

- `quick`: the package as it is;
- `flax`: Flax's check restored (the mixin hands the real initialiser on, as before session 13).

Both trace the same program: the row's `hlo_sha256` (the lowered module without locations) says so.

    python -m experiments.bench_trace --config configs/liver.py:paper --patch 16,64,64 \\
        --variants quick,flax,quick,flax --tag cpu_2core --overrides \\
        depthwise_impl=shift,pointwise_impl=einsum,dense_pack_channels=32,batch_norm_impl=two_stage,dtype=bfloat16
"""

from __future__ import annotations

import argparse
import hashlib
import re
import time

from experiments.bench_common import (
    REPO,
    apply_overrides,
    environment,
    parse_overrides,
    print_result,
    run_child,
    stage_step_parts,
    stage_train_step,
    write_result,
)

VARIANTS = ("quick", "flax")


def measure(config_arg: str, patch: str, variant: str, overrides: str) -> dict:
    import flax.linen as nn
    import jax

    from livseg_jax.models import params
    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.state import init_lowering, jit_create_train_state
    from livseg_jax.training.step import replicated

    if variant == "flax":  # the initialiser reaches Flax's check again
        def flax_param(self, name, init_fn, *args, **kwargs):
            return nn.Module.param(self, name, init_fn, *args, **kwargs)

        params.QuickParamCheck.param = flax_param
    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    apply_overrides(config.model, parse_overrides(overrides))
    shape, spe, model, optimizer, mesh, batch = stage_step_parts(config, patch)
    with init_lowering():
        state = jit_create_train_state(model, optimizer, config.seed, replicated(mesh)).trace().out_info
    step = stage_train_step(config, model, optimizer, mesh)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
    start = time.perf_counter()
    traced = jax.jit(step.compute_gradients).trace(state, batch)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    text = re.sub(r"loc\([^)]*\)", "", lowered.as_text(debug_info=False))
    return {"variant": variant, "patch": list(shape), "trace_s": round(trace_s, 3), "lower_s": round(lower_s, 3),
            "equations": len(traced.jaxpr.eqns), "hlo_sha256": hashlib.sha256(text.encode()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--patch", default="", help="D,H,W in place of the config's patch (the trace is the same)")
    parser.add_argument("--variants", default="quick,flax")
    parser.add_argument("--overrides", default="", help="model config overrides, e.g. depthwise_impl=shift")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # child process: the variant
    args = parser.parse_args()
    if args.case:
        print_result(measure(args.config, args.patch, args.case, args.overrides))
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"error: unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
        row = run_child("experiments.bench_trace", ["--config", args.config, "--patch", args.patch,
                                                    "--overrides", args.overrides, "--case", variant])
        rows.append(row)
        print(f"{variant:6s} trace {row.get('trace_s')} s, lower {row.get('lower_s')} s, "
              f"{row.get('equations')} equations, HLO {str(row.get('hlo_sha256'))[:12]}", flush=True)
    write_result(f"bench_trace_{args.tag}", {"benchmark": "trace", "config": args.config, "overrides": args.overrides,
                                             "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
