"""experiments/bench_dispatch.py: the state's arrays as they are against packed, through one program."""

import jax.numpy as jnp
import numpy as np

from experiments import bench_dispatch


def test_packing_keeps_every_number_in_one_array_per_dtype():
    leaves = [jnp.ones((2, 3), jnp.float32), jnp.ones((4,), jnp.int32), jnp.ones((5,), jnp.float32)]
    packed = bench_dispatch.packed_like(leaves)
    assert sorted((str(a.dtype), a.size) for a in packed) == [("float32", 11), ("int32", 4)]


def test_each_variant_passes_the_train_states_arrays_or_their_packing(monkeypatch):
    monkeypatch.setenv("LIVSEG_TINY", "1")  # CI's tiny network: the paper state's structure, seconds to run
    rows = {v: bench_dispatch.measure("configs/liver.py", v, calls=3) for v in bench_dispatch.VARIANTS}
    state_arrays = rows["identity"]["state_arrays"]
    assert state_arrays > 50 and all(r["state_arrays"] == state_arrays for r in rows.values())
    assert rows["identity"]["arrays_in"] == rows["add_one"]["arrays_in"] == state_arrays
    assert rows["identity_packed"]["arrays_in"] == rows["add_one_packed"]["arrays_in"] <= 3
    assert all(np.isfinite(r["dispatch_ms"]) and r["back_to_back_ms"] > 0 for r in rows.values())
