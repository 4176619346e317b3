"""The tiny set-up every comparison network (SPEC 1.5) is tested at, and what differs between them.

tests/test_networks.py runs the checks every network must pass (shapes, heads, gradients, bf16,
patch errors, computation forms, deploy form, PyTorch parity, converter) over `SPECS`;
tests/test_<network>.py test each network's own mechanism with the helpers below.
Tiny widths (`FEATURES`), a 16^3 patch, batch 2.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import pytest

from livseg_jax.config import model_config
from livseg_jax.interop import mapping
from livseg_jax.models import build_model
from livseg_jax.models.forms import REFERENCE_FORMS
from tools import parity

FEATURES = (4, 8, 8, 8, 8)
LEVELS = len(FEATURES)
PATCH = (16, 16, 16)
BATCH = 2
CAT = 4  # UNet 3+ decoder fusion width (the paper's 64) at the tiny scale
TOL = 1e-4  # PyTorch parity: max |difference| / max |reference|

DECODER_HEADS = FEATURES[-2::-1]  # one head per decoder level, coarse to fine: its input width


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """What the shared checks must know of one network at the tiny widths."""

    head_widths: tuple[int, ...]  # channels each head reads, coarse to fine (one entry per head)
    grad_probe: str  # a first-level kernel (under params) the training loss's gradient must reach
    missing: tuple[str, str]  # a torch key of the network and its Flax path (converter report)
    overrides: Mapping = dataclasses.field(default_factory=dict)  # config keys besides the widths
    divisor: int = 2 ** (LEVELS - 1)  # every patch side must divide by it
    # Configs with other shapes: the converter reports mismatched keys and nothing missing.
    wider: tuple[Mapping, ...] = ({"features": (*FEATURES[:-1], 2 * FEATURES[-1])},)

    @property
    def n_heads(self) -> int:
        """Returns the number of deep-supervision heads."""
        return len(self.head_widths)


SPECS: dict[str, NetworkSpec] = {
    "attention_unet": NetworkSpec(DECODER_HEADS, "enc0/conv0/conv/kernel",
                                  ("gate1.theta.weight", "params/gate1/theta/kernel")),
    "resunet": NetworkSpec(DECODER_HEADS, "enc0/conv1/conv/kernel",
                           ("enc2.preact.running_var", "batch_stats/enc2/preact/var")),
    # Five widths: stem, three stride-2 encoder units, the bridge: 3 decoder levels, patches by 8.
    "resunet_pp": NetworkSpec(DECODER_HEADS[1:], "enc0/conv0/kernel",
                              ("dec1.pre0.pre_bn.weight", "params/dec1/pre0/pre_bn/scale"), divisor=8),
    "r2unet": NetworkSpec(DECODER_HEADS, "enc0/rec0/unit/conv/kernel",
                          ("enc0.rec1.unit.conv.weight", "params/enc0/rec1/unit/conv/kernel")),
    "riunet": NetworkSpec(DECODER_HEADS, "enc0/branch5/conv2/conv/kernel",
                          ("enc1.branch5.conv2.conv.weight", "params/enc1/branch5/conv2/conv/kernel")),
    # Full-scale deep supervision (as the paper): a head on the bottleneck, then one on every
    # decoder level, each of which fuses LEVELS maps of CAT channels.
    "unet3plus": NetworkSpec((FEATURES[-1],) + (LEVELS * CAT,) * (LEVELS - 1), "enc0/conv0/conv/kernel",
                             ("dec1.scale3.conv.weight", "params/dec1/scale3/conv/kernel"),
                             overrides={"cat_channels": CAT},
                             wider=({"features": (*FEATURES[:-1], 2 * FEATURES[-1])}, {"cat_channels": CAT + 1})),
}


def tiny(name: str, **overrides) -> ml_collections.ConfigDict:
    """Returns the model section of network `name` at the tiny widths, reference forms, `overrides`."""
    cfg = model_config(name)
    cfg.features = FEATURES
    cfg.update(REFERENCE_FORMS)
    cfg.update(SPECS[name].overrides if name in SPECS else {})
    cfg.update(overrides)
    return cfg


def inputs(seed: int = 0, patch=PATCH, channels: int = 1, batch: int = BATCH) -> np.ndarray:
    """Returns a float32 N(0, 1) input (batch, *patch, channels) drawn from `seed`."""
    return np.random.default_rng(seed).normal(size=(batch, *patch, channels)).astype(np.float32)


@functools.cache
def variables(name: str, seed: int = 0) -> dict:
    """Returns random numpy variables of the tiny `name` with non-trivial BatchNorm statistics."""
    return parity.random_flax_variables(mapping.flax_variable_shapes(tiny(name)), seed)


@functools.cache
def eval_output(name: str) -> np.ndarray:
    """Returns the tiny `name`'s evaluation output for `variables(name)` on `inputs()`."""
    model = build_model(tiny(name))
    return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables(name), inputs()))


def rel_error(reference, other) -> float:
    """Returns max |reference - other| / max |reference| (float64)."""
    return parity.errors(np.asarray(reference), np.asarray(other))[1]


def torch_models():
    """Returns `livseg_jax.interop.torch_models` (skips the test without torch), torch on 2 threads."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    from livseg_jax.interop import torch_models as tm

    return tm
