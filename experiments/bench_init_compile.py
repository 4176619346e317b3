"""Compile time of the model initialisation program, optimised (XLA's default) and at backend level 0.

`training.state.INIT_COMPILER_OPTIONS` compiles the initialisation without LLVM's optimisations:
it runs once, in milliseconds, so only its compile time matters. This compares both compilations
of the same lowered program side by side in one process (no persistent cache), `--repeats` times
in alternation (a different seed each time), and the largest difference between the two states
(of the last repeat).

    python -m experiments.bench_init_compile --config configs/liver.py:paper --tag cpu_2core
    python -m experiments.bench_init_compile --config configs/liver.py:paper --tag h200   # on a GPU

Writes experiments/results/bench_init_compile_<tag>.json and prints a table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from experiments.bench_common import REPO, environment, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/liver.py:paper")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tag", default="local")
    args = parser.parse_args()

    import jax

    from livseg_jax.models import build_model
    from livseg_jax.study.spec import load_config_file
    from livseg_jax.training.schedules import make_optimizer
    from livseg_jax.training.state import INIT_COMPILER_OPTIONS, create_train_state

    path, _, arg = args.config.partition(":")
    config = load_config_file(REPO / path, arg)
    model = build_model(config.model, deploy=False)
    optimizer = make_optimizer(config.optim, int(config.train.steps_per_epoch))
    variants = {"optimised (XLA default)": {}, "backend level 0 (shipped)": INIT_COMPILER_OPTIONS}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    states = {}
    for repeat in range(args.repeats):
        # A new seed per repeat: JAX keeps compiled programs in memory, so the same program again
        # would not compile at all.
        lowered = jax.jit(lambda seed=repeat: create_train_state(model, optimizer, seed)).lower()
        for name, options in variants.items():
            start = time.perf_counter()
            compiled = lowered.compile(compiler_options=options)
            seconds[name].append(round(time.perf_counter() - start, 2))
            states[name] = jax.tree.leaves(jax.block_until_ready(compiled()))
    a, b = (states[name] for name in variants)
    diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) for x, y in zip(a, b, strict=True)]
    payload = {"benchmark": "init_compile", "config": args.config, "environment": environment(),
               "compile_s": seconds, "min_compile_s": {k: min(v) for k, v in seconds.items()},
               "max_abs_difference": float(max(d.max() for d in diffs)),
               "elements_differing": int(sum(np.count_nonzero(d) for d in diffs)),
               "elements": int(sum(d.size for d in diffs))}
    path = write_result(f"bench_init_compile_{args.tag}", payload)
    print("| initialisation program | compile s (each repeat) |\n|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {', '.join(map(str, values))} |")
    print(f"states differ by at most {payload['max_abs_difference']:.3g} in {payload['elements_differing']:,} of "
          f"{payload['elements']:,} elements; wrote {path}")


if __name__ == "__main__":
    main()
