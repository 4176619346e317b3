"""The train step's optimiser part alone: Adam over the paper network's parameters, and the
gradient norm the step reports, in several forms (issue 21 target 4).

The bf16 train step's profile (docs/benchmarks.md, session 10) held 351 fusions of the parameter
update, most of them for BatchNorm scales and biases of 8-256 values, each also summing its
gradient's squares for the gradient norm: hundreds of kernels of about 3 us each, 1.0 ms per
step. XLA's horizontal loop fusion, which exists to merge such kernels, takes only loop fusions
(`horizontal_loop_fusion.cc`): not reductions, not fusions sharing an entry parameter (as the
injected hyper-parameters b1, b2, eps and eps_root are), not fusions with an output used outside
the one consumer. Forms:

- `per_leaf`: what `training.step` did before session 10: `optimizer.update`, `optax.apply_updates`, and
  `optax.tree.norm(grads)`, whose per-leaf sums XLA fuses into the per-leaf updates;
- `flat_norm`: the same update, the norm of one concatenation of every gradient
  (`training.step.global_norm`, what the step does since session 10), so the updates are loop
  fusions (still sharing the hyper-parameters);
- `static_hyperparams`: as `flat_norm`, with b1, b2, eps and eps_root compile-time constants
  (`optax.inject_hyperparams(..., static_args=...)`): the updates share no parameter;
- `flat_adam`: Adam itself on one concatenation of the parameters (`optax.flatten`, which keeps
  the moments as single vectors: another optimiser-state layout), the norm as in `flat_norm`.

Each donates the parameters and the optimiser state, as the train step does. Records per form the
fusions in the compiled program, the device's kernel time per update (from a profiler trace) and
the wall time per update back to back, which on a GPU is mostly the host dispatching the arrays
(~1,600; `flat_adam` fewer).

    python -m experiments.bench_optimizer_update --tag h200 [--steps 200]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.bench_common import back_to_back_ms, environment, write_result
from experiments.profile_train_step import read_trace, summarise
from livseg_jax.config import base_config, model_config
from livseg_jax.models import build_model, variable_shapes
from livseg_jax.training.schedules import learning_rate_schedule, make_optimizer
from livseg_jax.training.step import global_norm

FORMS = ("per_leaf", "flat_norm", "static_hyperparams", "flat_adam")
STATIC_HYPERPARAMS = ("b1", "b2", "eps", "eps_root")


def gradient_norm(grads, form: str) -> jax.Array:
    """Returns the global L2 norm of `grads` computed in `form` (see the module doc)."""
    return optax.tree.norm(grads) if form == "per_leaf" else global_norm(grads)


def form_optimizer(optim_config: ml_collections.ConfigDict, form: str) -> optax.GradientTransformation:
    """Returns the optimiser `form` runs (see the module doc), for 100 steps per epoch: the package's
    (`training.schedules.make_optimizer`, every hyper-parameter injected), or as it with Adam's
    constants compiled in (`static_hyperparams`; `flat_adam` also flattens that one)."""
    if form in ("per_leaf", "flat_norm"):
        return make_optimizer(optim_config, 100)
    optimizer = optax.inject_hyperparams(optax.adam, static_args=STATIC_HYPERPARAMS)(
        learning_rate=learning_rate_schedule(optim_config, 100), b1=float(optim_config.b1),
        b2=float(optim_config.b2), eps=float(optim_config.eps))
    return optax.flatten(optimizer) if form == "flat_adam" else optimizer


def make_update(optim_config: ml_collections.ConfigDict, form: str):
    optimizer = form_optimizer(optim_config, form)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, gradient_norm(grads, form)

    return jax.jit(update, donate_argnums=(0, 1))


def fusion_count(hlo_text: str) -> int:
    """Returns how many fusions the entry computation of an optimised HLO module launches."""
    entry = re.search(r"^ENTRY .*?^\}", hlo_text, re.M | re.S)
    return len(re.findall(r" fusion\(", entry.group(0))) if entry else -1


def kernel_ms(run, sync, steps: int) -> float | None:
    """Returns the device's kernel time per call of `run` from a profiler trace of `steps` calls
    (None on a host without a GPU or TPU: the trace then has no device lines)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run()
            sync()
        summary = summarise(read_trace(pathlib.Path(trace_dir)), steps, 1, {})
    return summary["kernel_ms_per_step"] or None


def run_form(form: str, params, grads, optim_config: ml_collections.ConfigDict, steps: int) -> dict:
    update = make_update(optim_config, form)
    params = jax.tree.map(jnp.copy, params)
    opt_state = form_optimizer(optim_config, form).init(params)
    compiled = update.lower(params, opt_state, grads).compile()
    state = {"params": params, "opt_state": opt_state}

    def one():
        state["params"], state["opt_state"], state["norm"] = compiled(state["params"], state["opt_state"], grads)

    def sync():
        jax.block_until_ready(state["norm"])

    one()
    timing = back_to_back_ms(one, sync, steps)
    return {"form": form, "fusions": fusion_count(compiled.as_text()), "norm": float(state["norm"]),
            "kernel_ms": kernel_ms(one, sync, min(steps, 20)), **timing}


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
    optim_config = ml_collections.ConfigDict(base_config().optim)
    rows = [run_form(form, params, grads, optim_config, args.steps) for form in FORMS]
    leaves = len(jax.tree.leaves(params))
    for row in rows:
        print(f"{row['form']:>18}: {row['fusions']:4d} fusions, kernels {row['kernel_ms'] or float('nan'):.3f} ms, "
              f"{row['back_to_back_ms']:.3f} ms per update back to back "
              f"({leaves} parameter arrays), norm {row['norm']:.6f}", flush=True)
    write_result(f"bench_optimizer_update_{args.tag}", {"benchmark": "bench_optimizer_update", "variant": args.variant,
                                                        "parameter_arrays": leaves, "steps": args.steps,
                                                        "environment": environment(), "rows": rows})


if __name__ == "__main__":
    main()
