"""Finds where a training run first produces a non-finite value, module by module.

Runs training steps on fixed random data until the loss, a parameter or a BatchNorm statistic is
non-finite; names the tensors; re-runs the bad step from the same state three times (the same
result each time points at the graph, a varying one at a kernel or memory race); with
`--modules`, reports the forward pass before the bad step module by module (output finite?
largest magnitude?).

    python -m tools.diagnose_nonfinite --dtype bfloat16 --patch 48,256,256 --steps 8 [--no-donate]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_common import apply_overrides, parse_overrides
from livseg_jax.atomic_write import write_text
from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _named(tree) -> dict:
    return {_path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def module_report(model, variables, image):
    """Returns [(module path, finite, max |output|)] of every module output of a train forward."""

    @jax.jit
    def run(variables):
        _, state = model.apply(variables, image, train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=True)
        outputs = state["intermediates"]
        finite = jax.tree.map(lambda v: jnp.all(jnp.isfinite(v)), outputs)
        largest = jax.tree.map(lambda v: jnp.max(jnp.abs(v.astype(jnp.float32))), outputs)
        return finite, largest

    finite, largest = jax.device_get(run(variables))
    paths = jax.tree_util.tree_leaves_with_path(finite)
    return [(_path_name(p), bool(f), float(m)) for (p, f), m in zip(paths, jax.tree.leaves(largest), strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--features", default="16,32,64,128,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--overrides", default="")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--no-donate", action="store_true", help="compile the step without donating the state")
    parser.add_argument("--modules", action="store_true", help="also report the forward module by module")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    config = base_config()
    config.model.name, config.model.dtype = args.variant, args.dtype
    config.model.features = tuple(int(v) for v in args.features.split(","))
    apply_overrides(config.model, parse_overrides(args.overrides))
    if args.learning_rate is not None:
        config.optim.learning_rate = args.learning_rate
    patch = tuple(int(v) for v in args.patch.split(","))
    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, 100)
    mesh = make_mesh(jax.devices()[:1])
    state = jax.jit(lambda: create_train_state(model, optimizer, 0), out_shardings=replicated(mesh))()
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(args.batch, *patch, 1)).astype(np.float32))
    labels = jnp.asarray((rng.random((args.batch, *patch)) < 0.2).astype(np.int32))
    batch = {"image": image, "label": labels}
    step = jit_train_step(make_train_step(model, optimizer, config.loss, 100), mesh, not args.no_donate)
    all_finite = jax.jit(lambda tree: jax.tree.map(lambda v: jnp.all(jnp.isfinite(v)), tree))
    report: dict = {"args": vars(args), "xla_flags": os.environ.get("XLA_FLAGS", ""), "losses": [], "step_ms": []}
    bad_step = None
    for i in range(args.steps):
        previous = jax.tree.map(jnp.copy, state)  # the step donates its input state
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        report["step_ms"].append((time.perf_counter() - t0) * 1e3)
        report["losses"].append(loss)
        bad_params = [k for k, ok in _named(jax.device_get(all_finite(state.params))).items() if not ok]
        bad_stats = [k for k, ok in _named(jax.device_get(all_finite(state.batch_stats))).items() if not ok]
        print(f"step {i + 1}: loss {loss:.5f} grad norm {float(metrics['grad_norm']):.4f} "
              f"({report['step_ms'][-1]:.1f} ms incl. host copies); non-finite after it: "
              f"params {bad_params[:6]} batch_stats {bad_stats[:6]}", flush=True)
        if bad_params or bad_stats or not np.isfinite(loss):
            bad_step = i + 1
            report.update(bad_step=bad_step, bad_params=bad_params, bad_stats=bad_stats)
            break
    if bad_step is None:
        print("all steps finite")
    else:
        repeats = []
        for _ in range(3):
            again, m = step(jax.tree.map(jnp.copy, previous), batch)
            bad = [k for k, ok in _named(jax.device_get(all_finite(again.params))).items() if not ok]
            repeats.append((float(m["loss"]), float(m["grad_norm"]), bad[:6]))
        print(f"step {bad_step} again from the same state, 3 times (loss, grad norm, non-finite params):", repeats)
        report["repeats"] = repeats
        if args.modules:
            variables = {"params": previous.params, "batch_stats": previous.batch_stats}
            rows = module_report(model, variables, image)
            bad = [r for r in rows if not r[1]]
            print(f"forward before step {bad_step}: {len(bad)} of {len(rows)} module outputs non-finite:", bad[:10])
            report["modules"] = rows
    if args.json:
        write_text(args.json, json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
