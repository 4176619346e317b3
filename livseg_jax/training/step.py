"""The jit-compiled training step and its shardings.

Data parallelism is expressed with shardings only: the batch is split over the `data` axis of a
mesh of all devices, the state is replicated, and XLA inserts the gradient all-reduce. BatchNorm
statistics computed inside `jax.jit` over a sharded batch are global (synchronised) without any
`axis_name` (SPEC 5.1): XLA inserts an all-reduce for every BatchNorm's statistics, forward and
backward.

`train.batch_norm_stats = "per_device"` gives each device's shard its own statistics instead, as
PyTorch DDP does without SyncBatchNorm: the model and its loss run under `jax.shard_map` over the
`data` axis, each device on its own shard of the batch, so no statistic crosses a device and each
device runs the one-device program on its shard. The loss is the mean of the devices' losses (a
`pmean`), which for equal shards is the loss of the whole batch as a function of the logits (every
loss averages per-example terms: Dice and Tversky are per example, BCE per voxel); only the logits
differ, through the statistics. Differentiating through `shard_map` sums the replicated parameters'
gradients of the `pmean`ed loss over the devices: the mean of the devices' gradients. The new
running statistics are the mean of the devices' (as timm's `distribute_bn(reduce=True)`; DDP with
its default `broadcast_buffers=True` instead copies rank 0's to every rank at each forward pass).
Until session 10 the model was `jax.vmap`ped over a (devices, B / devices, ...) view of the batch
instead: the same values, but not the one-device program.
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
from livseg_jax.training.step_programs import SplitStep, check_step_programs

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
    return mesh.shape[DATA_AXIS]


def _device_varying(x: jax.Array) -> jax.Array:
    """Casts `x`, the same on every device of the `data` axis inside `shard_map`, to device-varying."""
    if hasattr(jax.lax, "pcast"):  # jax >= 0.8.2; pvary before (removed in 0.10)
        return jax.lax.pcast(x, DATA_AXIS, to="varying")
    return jax.lax.pvary(x, DATA_AXIS)


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
    devices draw dropout masks from keys split from the step's key.
    """
    ds_alpha = ds_alpha_schedule(loss_config, steps_per_epoch)
    groups = batch_norm_groups(batch_norm_stats, mesh)

    def apply_and_loss(params, batch_stats, image, label, rng, alpha):
        outs, updates = model.apply({"params": params, "batch_stats": batch_stats}, image, train=True,
                                    mutable=["batch_stats"], rngs={"dropout": rng})
        total, per_head = losses.deep_supervision_loss(outs, label, loss_config, alpha)
        return total, (per_head, updates["batch_stats"])

    def per_device_apply_and_loss(params, batch_stats, image, label, rng, alpha):
        if image.shape[0] % groups:
            raise ValueError(f"batch of {image.shape[0]} does not split into equal shards for {groups} devices "
                             "(train.batch_norm_stats = 'per_device')")
        keys = jax.random.split(rng, groups)  # one dropout key per device's shard

        def on_shard(params, batch_stats, image, label, keys, alpha):
            # The parameters enter as device-varying copies: custom-gradient layers (BatchNorm's
            # two-stage form, the depthwise shift form) then return per-device parameter gradients of
            # the type shard_map expects, and the cast's transpose sums them over the devices.
            params = jax.tree.map(_device_varying, params)
            total, (per_head, stats) = apply_and_loss(params, batch_stats, image, label, keys[0], alpha)
            mean = lambda a: jax.lax.pmean(a, DATA_AXIS)  # noqa: E731
            return mean(total), (mean(per_head), jax.tree.map(mean, stats))

        shard, whole = P(DATA_AXIS), P()
        # check_vma: shard_map tracks what varies over devices, which the parameters' cast relies on.
        on_devices = jax.shard_map(on_shard, mesh=mesh, in_specs=(whole, whole, shard, shard, shard, whole),
                                   out_specs=(whole, (whole, whole)), check_vma=True)
        return on_devices(params, batch_stats, image, label, keys, alpha)

    # One group is the whole batch: the global step itself (the same program, bit for bit).
    forward = apply_and_loss if groups == 1 else per_device_apply_and_loss

    def forward_pass(state: TrainState, batch: dict[str, jax.Array]):
        """The forward pass: (the loss's pullback to the parameters, what the update needs)."""
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        alpha = ds_alpha(state.step)
        if augment is not None:
            image, label = augment_batch(jax.random.fold_in(dropout_rng, AUGMENT_STREAM), batch["image"],
                                         batch["label"], augment)
            batch = {**batch, "image": image, "label": label}

        def loss_fn(params):
            return forward(params, state.batch_stats, batch["image"], batch["label"], dropout_rng, alpha)

        loss, pullback, (per_head, batch_stats) = jax.vjp(loss_fn, state.params, has_aux=True)
        return pullback, {"loss": loss, "per_head": per_head, "batch_stats": batch_stats, "alpha": alpha}

    def compute_gradients(state: TrainState, batch: dict[str, jax.Array]):
        """The forward and backward passes: (the gradients, what the update needs)."""
        pullback, aux = forward_pass(state, batch)
        (grads,) = pullback(jnp.ones_like(aux["loss"]))  # as jax.value_and_grad does
        return grads, aux

    def apply_gradients(state: TrainState, grads, aux: dict):
        """The optimiser's update of `state` by `grads`: (the next state, the step's metrics)."""
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=aux["batch_stats"],
            opt_state=opt_state,
        )
        metrics = {
            "loss": aux["loss"],
            "loss_final_head": aux["per_head"][-1],
            "ds_alpha": aux["alpha"],
            "learning_rate": current_learning_rate(opt_state),
            "grad_norm": global_norm(grads),
        }
        return new_state, metrics

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        return apply_gradients(state, *compute_gradients(state, batch))

    # The parts, for compiling the step as two or three programs (training/step_programs.py) and for measuring
    # other splits (experiments/bench_split_step.py).
    train_step.forward_pass = forward_pass
    train_step.compute_gradients = compute_gradients
    train_step.apply_gradients = apply_gradients
    return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, donate_state: bool = True,
                   programs: int | None = 1) -> Callable:
    """Returns the step compiled with the state replicated (donated by default), the batch sharded.

    Donation lets XLA write the new state into the old one's buffers; the state of the paper's
    network is ~45 MB, so `donate_state=False` costs little and is kept as a switch for the bf16
    investigation in docs/performance_notes.md. `programs` 2 or 3 (`train.step_programs`; None: 2 on
    GPUs, 1 elsewhere) compiles the step as that many programs side by side (the gradients and the
    update; or the forward pass, the backward pass and the update), none donating
    (`livseg_jax.training.step_programs` says why).
    """
    count = check_step_programs(programs, mesh.devices.flat[0].platform)
    if count > 1:
        return SplitStep(train_step, (replicated(mesh), batch_sharding(mesh)), replicated(mesh), count)
    return jax.jit(
        train_step,
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=0 if donate_state else (),
    )
