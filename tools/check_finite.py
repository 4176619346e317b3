"""Runs a few training steps of one variant and prints the loss of each step and where the first
non-finite value appears (forward heads, loss, gradients). A check to run whenever a dtype, flag
or layout changes (SPEC 5.1): `python tools/check_finite.py --dtype bfloat16 --patch 48,256,256`."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from livseg_jax import losses
from livseg_jax.config import base_config
from livseg_jax.models import build_model
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--patch", default="16,64,64")
    parser.add_argument("--features", default="16,32,64,128,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--overrides", default="")
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
    image = rng.normal(size=(args.batch, *patch, 1)).astype(np.float32)
    labels = (rng.random((args.batch, *patch)) < 0.2).astype(np.int32)

    @jax.jit
    def probe(state):
        outs, _ = model.apply(state.variables, image, train=True, mutable=["batch_stats"])
        per_head = [losses.segmentation_loss(o, labels, config.loss) for o in outs]
        def loss_fn(p):
            o, _ = model.apply({"params": p, "batch_stats": state.batch_stats}, image, train=True,
                               mutable=["batch_stats"])
            return losses.deep_supervision_loss(o, labels, config.loss, 0.4)[0]
        grads = jax.grad(loss_fn)(state.params)
        bad = {"/".join(str(getattr(k, "key", k)) for k in path): ~jnp.all(jnp.isfinite(g))
               for path, g in jax.tree_util.tree_leaves_with_path(grads)}
        return [jnp.all(jnp.isfinite(o)) for o in outs], per_head, bad

    heads_ok, per_head, bad = jax.device_get(probe(state))
    print("forward heads finite:", [bool(h) for h in heads_ok], "per-head loss:", [float(v) for v in per_head])
    bad_names = [k for k, v in bad.items() if v]
    print(f"non-finite gradient tensors: {len(bad_names)}", bad_names[:8])
    step = jit_train_step(make_train_step(model, optimizer, config.loss, 100), make_mesh(jax.devices()[:1]))
    batch = {"image": jnp.asarray(image), "label": jnp.asarray(labels)}
    for i in range(args.steps):
        previous = jax.tree.map(jnp.copy, state)  # the step donates its input state
        state, metrics = step(state, batch)
        loss = float(metrics["loss"])
        print(f"step {i + 1}: loss {loss:.5f} grad norm {float(metrics['grad_norm']):.4f}", flush=True)
        if not np.isfinite(loss):
            heads_ok, per_head, bad = jax.device_get(probe(previous))
            print("state before the bad step: forward heads finite:", [bool(h) for h in heads_ok],
                  "per-head loss:", [float(v) for v in per_head])
            print("non-finite gradient tensors:", [k for k, v in bad.items() if v][:12])
            stats = jax.tree_util.tree_leaves_with_path(previous.batch_stats)
            print("smallest running variances:", sorted((float(jnp.min(v)), "/".join(
                str(getattr(k, "key", k)) for k in path)) for path, v in stats if path[-1].key == "var")[:5])
            break


if __name__ == "__main__":
    main()
