"""Training each comparison network on synthetic phantoms for 60 steps lowers its loss clearly.

What `livseg_jax.train` runs: the default config's loss (HybridLoss1 with deep supervision) and
optimiser (Adam at the CPU demo preset's learning rate), `create_train_state`, `make_train_step`
and `jit_train_step`. Small enough for CI: tiny widths and three levels, (8, 16, 16) patches
around the liver of four built-in phantoms (`data.synthetic.make_phantom`, preprocessed by
`data.preprocess.preprocess` as the pipeline does), batch 2, two fixed batches in turn, one
compilation of the step per network. Long runs belong in experiments/.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from network_checks import SPECS, tiny

from livseg_jax.config import base_config
from livseg_jax.data.preprocess import preprocess
from livseg_jax.data.synthetic import make_phantom
from livseg_jax.models import build_model
from livseg_jax.training.schedules import make_optimizer
from livseg_jax.training.state import create_train_state
from livseg_jax.training.step import jit_train_step, make_mesh, make_train_step, replicated

FEATURES = (4, 8, 8)
PATCH = (8, 16, 16)  # (D, H, W)
# The steps, not the compile, took most of each network's 18-44 s at 150 steps (r2unet: 5 s to
# compile, 20 s for the steps on the 2-core machine, session 15). After 60 steps the last window's
# mean loss is already 0.04-0.50 of the first's (riunet the slowest), well under the bound.
STEPS = 60
WINDOW = 10  # steps averaged at the start and at the end
# Every comparison network. The paper's variants are left out: each costs as much again (the
# ELANRes/MSCA ones 2-4x more to compile).
TRAINED = tuple(SPECS)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, jax.Array]]:
    """Two fixed batches of two liver-centred patches: windowed CT and the liver mask."""
    settings = base_config().preprocess
    images, labels = [], []
    for seed in range(4):
        hu_xyz, label_xyz = make_phantom((80, 80, 16), (5.0, 5.0, 10.0), seed=seed)
        image, label, _ = preprocess(hu_xyz.T, (10.0, 5.0, 5.0), settings, label_xyz.T)  # (D, H, W)
        centre = np.argwhere(label > 0).mean(axis=0).round().astype(int)
        start = [min(max(c - p // 2, 0), n - p) for c, p, n in zip(centre, PATCH, label.shape, strict=True)]
        box = tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))
        images.append(image[box][..., None])
        labels.append((label[box] > 0).astype(np.int32))
    fractions = [float(m.mean()) for m in labels]
    assert all(0.1 < f < 0.9 for f in fractions), fractions  # both classes to learn in every patch
    return [{"image": jnp.asarray(np.stack(images[i:i + 2])), "label": jnp.asarray(np.stack(labels[i:i + 2]))}
            for i in (0, 2)]


@pytest.mark.parametrize("name", TRAINED)
def test_60_training_steps_lower_the_loss(name, batches):
    config = base_config()
    config.model = tiny(name, features=FEATURES)
    config.optim.learning_rate = 1e-3  # the CPU demo preset's (config.stage_config)
    model = build_model(config.model)
    optimizer = make_optimizer(config.optim, STEPS)
    mesh = make_mesh(jax.devices()[:1])
    state = jax.jit(lambda: create_train_state(model, optimizer, config.seed),
                    out_shardings=replicated(mesh))()
    step = jit_train_step(make_train_step(model, optimizer, config.loss, STEPS), mesh)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batches[i % len(batches)])
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert np.all(np.isfinite(losses))
    first, last = losses[:WINDOW].mean(), losses[-WINDOW:].mean()
    assert last < 0.7 * first, f"{name}: mean loss of the first {WINDOW} steps {first:.3f}, last {last:.3f}"
