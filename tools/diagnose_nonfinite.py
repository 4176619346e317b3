"""Finds where a training run first produces a non-finite value, module by module.

Runs training steps on fixed random data until the loss is non-finite, then, on the state
before the bad step, reports: whether parameters and BatchNorm statistics are finite; whether
re-running the same step on the same state reproduces the NaN (a deterministic graph problem) or
not (a kernel or memory problem); the forward pass in the run's dtype module by module (output
finite? largest magnitude?), and the same forward in float32.

    python tools/diagnose_nonfinite.py --dtype bfloat16 --patch 48,256,256 --steps 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _finite_tree(tree) -> dict[str, bool]:
    return {_path_name(p): bool(jnp.all(jnp.isfinite(v))) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


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
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    config = base_config()
    config.model.name, config.model.dtype = args.variant, args.dtype
    config.model.features = tuple(int(v) for v in args.features.split(","))
    for item in filter(None, args.overrides.split(",")):
        key, value = item.split("=", 1)
        config.model[key] = value
    patch = tuple(int(v) for v in args.patch.split(","))
    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, 100)
    state = jax.jit(lambda: create_train_state(model, optimizer, patch, 0))()
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.normal(size=(args.batch, *patch, 1)).astype(np.float32))
    labels = jnp.asarray((rng.random((args.batch, *patch)) < 0.2).astype(np.int32))
    batch = {"image": image, "label": labels}
    step = jit_train_step(make_train_step(model, optimizer, config.loss, 100), make_mesh(jax.devices()[:1]))
    report: dict = {"args": vars(args), "losses": []}
    previous = None
    for i in range(args.steps):
        previous = jax.tree.map(jnp.copy, state)  # the step donates its input state
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        report.setdefault("step_ms", []).append((time.perf_counter() - t0) * 1e3)
        report["losses"].append(loss)
        print(f"step {i + 1}: loss {loss:.5f} grad norm {float(metrics['grad_norm']):.4f} "
              f"({report['step_ms'][-1]:.1f} ms, includes a device-to-host copy)", flush=True)
        if not np.isfinite(loss):
            break
    else:
        print("all steps finite")
        previous = None
    if previous is not None:
        bad_params = [k for k, ok in _finite_tree(previous.params).items() if not ok]
        bad_stats = [k for k, ok in _finite_tree(previous.batch_stats).items() if not ok]
        print("non-finite params before the bad step:", bad_params[:10])
        print("non-finite batch_stats before the bad step:", bad_stats[:10])
        repeats = []
        for _ in range(3):
            _, m = step(jax.tree.map(jnp.copy, previous), batch)
            repeats.append(float(m["loss"]))
        print("same step on the same state, 3 times:", repeats)
        report.update(bad_params=bad_params, bad_stats=bad_stats, repeats=repeats)
        variables = {"params": previous.params, "batch_stats": previous.batch_stats}
        for name, mdl in (("run dtype", model), ("float32", dataclasses.replace(model, dtype=jnp.float32))):
            rows = module_report(mdl, variables, image)
            bad = [r for r in rows if not r[1]]
            largest = sorted(rows, key=lambda r: -r[2] if np.isfinite(r[2]) else 0)[:8]
            print(f"[{name}] modules with non-finite output: {len(bad)} of {len(rows)}")
            for r in bad[:25]:
                print("   ", r)
            print(f"[{name}] largest finite outputs:", largest)
            report[name] = {"bad": bad, "largest": largest}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
