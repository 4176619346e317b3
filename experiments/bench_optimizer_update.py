"""The train step's optimiser part alone: Adam over the paper network's parameters, and the
gradient norm the step reports, in two forms (issue 21 target 4).

The bf16 train step's profile (docs/benchmarks.md, session 9) holds 351 fusions of the parameter
update, most of them for BatchNorm scales and biases of 8-256 values, each also summing its
gradient's squares for the gradient norm: hundreds of kernels of a few microseconds. Forms:

- `per_leaf`: what `training.step` does: `optimizer.update`, `optax.apply_updates`, and
  `optax.tree.norm(grads)`, whose per-leaf sums XLA fuses into the per-leaf updates;
- `flat_norm`: the same update, the norm of one concatenation of every gradient: the updates
  are then plain elementwise fusions, which XLA may fuse horizontally into a few kernels.

Both donate the parameters and the optimiser state, as the train step does. Prints and records the
fusions in each compiled program and the time per update, back to back.

    python -m experiments.bench_optimizer_update --tag h200 [--steps 200]
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.bench_common import back_to_back_ms, environment, write_result
from livseg_jax.config import base_config, model_config
from livseg_jax.models import build_model, variable_shapes
from livseg_jax.training.schedules import make_optimizer

FORMS = ("per_leaf", "flat_norm")


def gradient_norm(grads, form: str) -> jax.Array:
    """Returns the global L2 norm of `grads` computed in `form` (see the module doc)."""
    if form == "per_leaf":
        return optax.tree.norm(grads)
    flat = jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in jax.tree.leaves(grads)])
    return jnp.sqrt(jnp.sum(flat * flat))


def make_update(optimizer: optax.GradientTransformation, form: str):
    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, gradient_norm(grads, form)

    return jax.jit(update, donate_argnums=(0, 1))


def fusion_count(hlo_text: str) -> int:
    """Returns how many fusions the entry computation of an optimised HLO module launches."""
    entry = re.search(r"^ENTRY .*?^\}", hlo_text, re.M | re.S)
    return len(re.findall(r" fusion\(", entry.group(0))) if entry else -1


def run_form(form: str, params, grads, optimizer, steps: int) -> dict:
    update = make_update(optimizer, form)
    params = jax.tree.map(jnp.copy, params)
    opt_state = optimizer.init(params)
    compiled = update.lower(params, opt_state, grads).compile()
    state = {"params": params, "opt_state": opt_state}

    def one():
        state["params"], state["opt_state"], state["norm"] = compiled(state["params"], state["opt_state"], grads)

    one()
    timing = back_to_back_ms(one, lambda: jax.block_until_ready(state["norm"]), steps)
    return {"form": form, "fusions": fusion_count(compiled.as_text()), "norm": float(state["norm"]), **timing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variant", default="elanres_msca_unet")
    args = parser.parse_args()
    shapes = variable_shapes(build_model(model_config(args.variant)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
    grads = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 1e-3, jnp.float32), shapes)
    optimizer = make_optimizer(ml_collections.ConfigDict(base_config().optim), 100)
    rows = [run_form(form, params, grads, optimizer, args.steps) for form in FORMS]
    leaves = len(jax.tree.leaves(params))
    for row in rows:
        print(f"{row['form']:>10}: {row['fusions']:4d} fusions, {row['back_to_back_ms']:.3f} ms per update "
              f"({leaves} parameter arrays), norm {row['norm']:.6f}", flush=True)
    write_result(f"bench_optimizer_update_{args.tag}", {"benchmark": "bench_optimizer_update", "variant": args.variant,
                                                        "parameter_arrays": leaves, "steps": args.steps,
                                                        "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
