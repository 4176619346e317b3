"""Test set-up: 8 virtual CPU devices, absl flags marked parsed (grain reads them), data paths."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small networks; XLA:CPU's LLVM optimisation dominates their run time and
# buys nothing at these sizes. XLA:CPU's older loop emitters compile a tiny ELANRes-MSCA-UNet's
# gradient in 8.4 s where its fusion emitters take 14.3 s (2-core machine, session 17). They compute
# the same operations, rounded differently in places (a test that needs bit-exact agreement with
# users' programs compiles with the defaults: tests/test_training.py); users' runs keep XLA's defaults.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
)

# `predict.main` turns on JAX's persistent compilation cache by default; the tests call it in
# process and must not change JAX's global configuration for the tests that follow.
os.environ.setdefault("LIVSEG_COMPILATION_CACHE", "off")
# `predict --backend auto` (the default) exports run directories to ONNX on a CPU; the tests compare
# against JAX and call predict many times, so their default is JAX and the auto choice has its own
# tests (tests/test_export.py).
os.environ.setdefault("LIVSEG_PREDICT_BACKEND", "jax")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("LIVSEG_REAL_DATA", REPO.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path of ../shared/data (real CT); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA
