"""The train step compiled as one program or as parts compiled at the same time (issue 21, target 2).

XLA's compile of the paper network's step is mostly serial: its HLO passes (priority fusion alone
~7.5 s on an H200 host) and its code emission run on one thread, and only the ~1,000 kernels'
LLVM and PTX compiles use the others (bench_compile's compile trace, session 11). Parts of the
step compiled as separate programs on separate threads run those serial phases side by side.
Each variant runs in a fresh process with no compilation cache (cold), with the XLA flags and
autotuning results `train` uses:

- `fused`: the step as one program (what `train` compiles);
- `split2`: the gradients (forward and backward) and the optimiser's update, two programs;
- `split2_kept`: the same, the update not donating the state and the gradients: `train`'s form
  with `train.step_programs=2` (`livseg_jax/training/step_programs.py`), which compiles the two
  itself (one `compile_s_each` entry; its session-11 rows predate that and list two);
- `split3`: forward, backward and update, three programs (the forward returns the pullback's
  residuals), the backward and the update donating their inputs;
- `split3_kept`: the same, neither donating (session 11 found donation slowed `split2`).

Each prints the wall time from the first trace to the last compile, then the step time back to
back (the parts dispatched one after the other, as training would run them). BENCH_SPLIT_CACHE=1 gives
the child an empty persistent compilation cache, as a cold `train` has; another value also sets
`jax_persistent_cache_enable_xla_caches` to it ("none": no per-fusion autotuning cache).

    python -m experiments.bench_split_step --config configs/liver.py:paper --tag h200
    python -m experiments.bench_split_step --config configs/liver.py --patch 16,32,32 --tag cpu  # smoke
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import time

from experiments.bench_common import (
    REPO,
    apply_overrides,
    apply_train_xla_flags,
    back_to_back_ms,
    environment,
    parse_overrides,
    print_result,
    run_child,
    stage_step_parts,
    stage_train_step,
    write_result,
)

VARIANTS = ("fused", "split2", "split2_kept", "split3", "split3_kept")


def measure(config_arg: str, patch: str, variant: str, steps: int, overrides: str = "") -> dict:
    import jax

    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.state import init_lowering, jit_create_train_state
    from livseg_jax.training.step import batch_sharding, jit_train_step, replicated

    path, _, arg = config_arg.partition(":")
    config = load_config_file(REPO / path, arg)
    apply_overrides(config.model, parse_overrides(overrides))
    if os.environ.get("BENCH_SPLIT_CACHE"):  # an empty persistent compilation cache, as a cold `train` has
        import tempfile

        from livseg_jax.compilation_cache import enable_compilation_cache

        enable_compilation_cache(pathlib.Path(tempfile.mkdtemp(prefix="bench_split_cache_")))
        if os.environ["BENCH_SPLIT_CACHE"] != "1":  # which XLA caches JAX turns on with it (default: autotuning)
            jax.config.update("jax_persistent_cache_enable_xla_caches", os.environ["BENCH_SPLIT_CACHE"])
    apply_train_xla_flags(config, "shipped" if os.environ.get("BENCH_SPLIT_AUTOTUNE", "1") == "1" else None)
    shape, spe, model, optimizer, mesh, batch = stage_step_parts(config, patch)
    with init_lowering():
        state = jit_create_train_state(model, optimizer, 0, replicated(mesh))()
    jax.block_until_ready(state)
    step = stage_train_step(config, model, optimizer, mesh)
    rep, sharded = replicated(mesh), batch_sharding(mesh)
    # Through wrappers: `jax.eval_shape(step.compute_gradients, ...)` would leave its trace in JAX's
    # cache, and the variants that jit `step.compute_gradients` would then skip most of their tracing
    # (the session-11 GPU rows of the split forms were measured so: their compile_s lacks it).
    if variant in ("split2", "split3", "split3_kept"):  # the update's argument shapes, for the hand splits
        grads_spec = jax.eval_shape(lambda s, b: step.compute_gradients(s, b), state, batch)

    def traced(jitted, *args):  # a program's compile, from its trace on
        return lambda: jitted.trace(*args)

    start = time.perf_counter()
    if variant == "fused":
        programs = [traced(jit_train_step(step, mesh), state, batch)]
    elif variant == "split2_kept":  # the library's form (train.step_programs=2): it compiles both at once
        programs = [traced(jit_train_step(step, mesh, programs=2), state, batch)]
    elif variant == "split2":
        programs = [traced(jax.jit(step.compute_gradients, in_shardings=(rep, sharded)), state, batch),
                    traced(jax.jit(step.apply_gradients, donate_argnums=(0, 1)), state, *grads_spec)]
    else:
        kept = variant == "split3_kept"
        # The backward program's argument is the forward's pullback, whose tree names the traced
        # function: taken from the forward's own trace (timed, before the parallel compiles).
        forward = jax.jit(step.forward_pass, in_shardings=(rep, sharded)).trace(state, batch)
        pullback_spec, aux_spec = forward.out_info
        backward = lambda pullback, loss: pullback(jax.numpy.ones_like(loss))[0]  # noqa: E731
        programs = [lambda: forward,
                    traced(jax.jit(backward, donate_argnums=() if kept else 0), pullback_spec, aux_spec["loss"]),
                    traced(jax.jit(step.apply_gradients, donate_argnums=() if kept else (0, 1)), state, *grads_spec)]

    def compile_one(trace):
        begin = time.perf_counter()
        compiled = trace().lower().compile()
        return compiled, round(time.perf_counter() - begin, 3)

    with concurrent.futures.ThreadPoolExecutor(len(programs)) as pool:
        done = list(pool.map(compile_one, programs))
    compile_s = round(time.perf_counter() - start, 3)
    compiled = [c for c, _ in done]

    def run(state):
        if variant in ("fused", "split2_kept"):
            return compiled[0](state, batch)
        if variant == "split2":
            grads, aux = compiled[0](state, batch)
            return compiled[1](state, grads, aux)
        pullback, aux = compiled[0](state, batch)
        grads = compiled[1](pullback, aux["loss"])
        return compiled[2](state, grads, aux)

    holder = {"state": state}

    def one_step():
        holder["state"], holder["metrics"] = run(holder["state"])

    one_step()
    jax.block_until_ready(holder["metrics"])
    timing = back_to_back_ms(one_step, lambda: jax.block_until_ready(holder["metrics"]), steps)
    start = time.perf_counter()  # the host's share: dispatching steps without waiting for them
    for _ in range(steps):
        one_step()
    timing["dispatch_ms"] = (time.perf_counter() - start) * 1e3 / steps
    jax.block_until_ready(holder["metrics"])
    return {"variant": variant, "compilation_cache": os.environ.get("BENCH_SPLIT_CACHE", ""),
            "compile_s": compile_s, "compile_s_each": [s for _, s in done],
            "loss": float(holder["metrics"]["loss"]), "patch": list(shape), **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--patch", default="", help="D,H,W (default: the config's patch)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--overrides", default="", help="model config key=value,... (depthwise_impl=shift_stacked)")
    parser.add_argument("--tag", default="local")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(measure(args.config, args.patch, args.child, args.steps, args.overrides))
        return
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
        row = run_child("experiments.bench_split_step", ["--child", variant, "--config", args.config,
                                                         "--patch", args.patch, "--steps", str(args.steps),
                                                         "--overrides", args.overrides])
        row["compilation_cache"] = os.environ.get("BENCH_SPLIT_CACHE", "")
        rows.append({"variant": variant, **row})
        print(f"{variant:8s} compile {row.get('compile_s')} s {row.get('compile_s_each')}, "
              f"step {row.get('back_to_back_ms')} ms, dispatch {row.get('dispatch_ms')} ms "
              f"{row.get('error', '')[:300]}", flush=True)
        write_result(f"bench_split_step_{args.tag}", {"benchmark": "split_step", "config": args.config,
                                                     "overrides": args.overrides,
                                                     "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
