"""experiments/bench_trace.py: Flax's parameter check and the quick one trace the same program."""

import os

from experiments.bench_common import run_child


def test_both_checks_trace_the_same_gradient_program():
    args = ["--config", "configs/liver.py", "--patch", "16,32,32", "--overrides", "depthwise_impl=shift"]
    env = {**os.environ, "LIVSEG_TINY": "1"}  # CI's tiny network: the same code path, seconds to trace
    quick, flax = (run_child("experiments.bench_trace", [*args, "--case", variant], env=env)
                   for variant in ("quick", "flax"))
    assert "error" not in quick and "error" not in flax, (quick, flax)
    assert quick["equations"] == flax["equations"] > 100
    assert quick["hlo_sha256"] == flax["hlo_sha256"]
    assert quick["trace_s"] > 0 and flax["lower_s"] > 0
