"""The jit-compiled training step and its shardings.

Data parallelism is expressed with shardings only: the batch is split over the `data` axis of a
mesh of all devices, the state is replicated, and XLA inserts the gradient all-reduce. BatchNorm
statistics computed inside `jax.jit` over a sharded batch are global (synchronised) without any
`axis_name` (SPEC 5.1): XLA inserts an all-reduce for every BatchNorm's statistics, forward and
backward.

`train.batch_norm_stats = "per_device"` gives each device's shard its own statistics instead, as
PyTorch DDP does without SyncBatchNorm: the batch is viewed as (devices, B / devices, ...) with the
group axis sharded over `data`, and the model is `jax.vmap`ped over the groups, so no statistic
crosses a device. The loss is the mean of the groups' losses, which for equal groups is the loss of
the whole batch as a function of the logits (every loss averages per-example terms: Dice and
Tversky are per example, BCE per voxel); only the logits differ, through the statistics. The new
running statistics are the mean of the groups' (as timm's `distribute_bn(reduce=True)`; DDP with its
default `broadcast_buffers=True` instead copies rank 0's to every rank at each forward pass).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from livseg_jax import losses
from livseg_jax.config import BATCH_NORM_STATS
from livseg_jax.data.augment_device import DeviceAugment, augment_batch
from livseg_jax.models import UNet3D
from livseg_jax.training.schedules import current_learning_rate, ds_alpha_schedule
from livseg_jax.training.state import TrainState

DATA_AXIS = "data"
# fold_in constant separating the augmentation's stream from dropout's (both from the step's key).
AUGMENT_STREAM = 0x61756721


def make_mesh(devices=None) -> Mesh:
    """Returns a 1-D mesh named `data` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Returns the sharding of a batch: leading axis split over `data`."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Returns the fully replicated sharding."""
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """Raises ValueError when the global batch does not split evenly over the devices."""
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"data.batch_size = {global_batch} does not divide by the {n} devices; "
            f"use a multiple of {n} (the batch is split over all devices)"
        )


def batch_norm_groups(batch_norm_stats: str, mesh: Mesh | None) -> int:
    """Returns how many groups of the batch get their own BatchNorm statistics (1: the whole batch).

    "global" -> 1; "per_device" -> the mesh's device count. Anything else raises ValueError naming
    `train.batch_norm_stats`.
    """
    if batch_norm_stats not in BATCH_NORM_STATS:
        raise ValueError(f"train.batch_norm_stats = {batch_norm_stats!r}: use one of {BATCH_NORM_STATS}")
    if batch_norm_stats == "global":
        return 1
    if mesh is None:
        raise ValueError('train.batch_norm_stats = "per_device" needs the mesh the step runs on')
    return mesh.devices.size


def global_norm(tree) -> jax.Array:
    """Returns the L2 norm of all of `tree`'s leaves together, in float32.

    Summed over one concatenation rather than leaf by leaf (`optax.tree.norm`): XLA fused per-leaf
    sums into the ~350 per-leaf parameter updates of the paper network, which made each a reduction
    kernel; kept apart, the updates are elementwise kernels of half the time (1.0 -> 0.5 ms of the
    bf16 step on an H200; docs/benchmarks.md, session 10).
    """
    leaves = [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
    if not leaves:  # as optax.tree.norm: a tree without arrays has norm 0
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


def make_train_step(model: UNet3D, optimizer: optax.GradientTransformation,
                    loss_config: ml_collections.ConfigDict, steps_per_epoch: int,
                    augment: DeviceAugment | None = None, batch_norm_stats: str = "global",
                    mesh: Mesh | None = None) -> Callable:
    """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    With `augment`, the batch holds regions (patch + margin) that the step augments and crops to
    the patch first, with a key that depends only on (state.rng, state.step): resumes are exact.
    `batch_norm_stats` is `train.batch_norm_stats` (module docstring); "per_device" needs `mesh`,
    the mesh `jit_train_step` compiles the step for; on one device it is the "global" step. Its
    groups draw dropout masks from keys split from the step's key.
    """
    ds_alpha = ds_alpha_schedule(loss_config, steps_per_epoch)
    groups = batch_norm_groups(batch_norm_stats, mesh)

    def apply_and_loss(params, batch_stats, image, label, rng, alpha):
        outs, updates = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": rng})
        total, per_head = losses.deep_supervision_loss(outs, label, loss_config, alpha)
        return total, (per_head, updates["batch_stats"])

    def grouped(x: jax.Array) -> jax.Array:
        """(B, ...) -> (groups, B / groups, ...), the group axis split over the devices."""
        if x.shape[0] % groups:
            raise ValueError(f"batch of {x.shape[0]} does not split into {groups} groups of equal size "
                             "(train.batch_norm_stats = 'per_device')")
        x = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))

    def per_group_apply_and_loss(params, batch_stats, image, label, rng, alpha):
        keys = jax.random.split(rng, groups)
        totals, (per_head, stats) = jax.vmap(
            apply_and_loss, in_axes=(None, None, 0, 0, 0, None), spmd_axis_name=DATA_AXIS,
        )(params, batch_stats, grouped(image), grouped(label), keys, alpha)
        mean = lambda a: jnp.mean(a, axis=0)  # noqa: E731
        return mean(totals), (mean(per_head), jax.tree.map(mean, stats))

    # One group is the whole batch: the global step itself (the same program, bit for bit).
    forward = apply_and_loss if groups == 1 else per_group_apply_and_loss

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        alpha = ds_alpha(state.step)
        if augment is not None:
            image, label = augment_batch(jax.random.fold_in(dropout_rng, AUGMENT_STREAM), batch["image"],
                                         batch["label"], augment)
            batch = {**batch, "image": image, "label": label}

        def loss_fn(params):
            return forward(params, state.batch_stats, batch["image"], batch["label"], dropout_rng, alpha)

        (loss, (per_head, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        metrics = {
            "loss": loss,
            "loss_final_head": per_head[-1],
            "ds_alpha": alpha,
            "learning_rate": current_learning_rate(opt_state),
            "grad_norm": global_norm(grads),
        }
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, donate_state: bool = True) -> Callable:
    """Returns the step compiled with the state replicated (donated by default), the batch sharded.

    Donation lets XLA write the new state into the old one's buffers; the state of the paper's
    network is ~45 MB, so `donate_state=False` costs little and is kept as a switch for the bf16
    investigation in docs/performance_notes.md.
    """
    return jax.jit(
        train_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0 if donate_state else (),
    )
