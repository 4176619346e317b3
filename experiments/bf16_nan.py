"""Narrows down the bf16 NaN of `elanres_msca_unet` with convolution 1x1s on a GPU (issue 21).

Three parts, one result file (`experiments/results/bf16_nan_<tag>.json`):

1. `isolate`: every 1x1(x1) convolution of the network's train forward, alone: forward, input
   gradient and kernel gradient in bf16 on random data, repeated, against the same computation
   in float32 (HIGHEST precision). Finds a kernel that is wrong on its own.
2. `step`: the real train step (`tools.diagnose_nonfinite`) with the conv 1x1s, twice in one
   run of this script: with state donation and without it (the same-run control the earlier
   notes lacked), each dumping its optimised HLO and its autotuning results.
3. `kernels`: from those dumps, the cuDNN custom calls of the 1x1 convolutions (forward,
   backward-input, backward-filter), with the module they belong to and the algorithm the
   autotuner chose, so a NaN can be tied to one kernel.

    python -m experiments.bf16_nan --tag h200 [--steps 6] [--patch 48,256,256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_common import environment, write_result
from livseg_jax.config import base_config
from livseg_jax.models import build_model, init_variables

# The forms of the failing baseline (docs/performance_notes.md): grouped-conv depthwise, conv 1x1s,
# plain 3x3x3 convs, Flax's BatchNorm (the runs predate the two-stage form). The GPU default forms
# avoid lax.conv for 1x1s (einsum) and were finite.
BASELINE_FORMS = {"depthwise_impl": "conv", "pointwise_impl": "conv", "dense_pack_channels": 0,
                  "batch_norm_impl": "flax"}


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def pointwise_convs(jaxpr) -> list[dict]:
    """Returns the distinct 1x1(x1) stride-1 convolutions of a jaxpr (recursing into sub-jaxprs)."""
    found = {}
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval for v in eqn.invars[:2])
                dn = eqn.params["dimension_numbers"]
                spatial = [rhs.shape[d] for d in dn.rhs_spec[2:]]
                strides = eqn.params["window_strides"]
                if all(k == 1 for k in spatial) and all(s == 1 for s in strides) \
                        and eqn.params["feature_group_count"] == 1:
                    key = (lhs.shape, rhs.shape, str(lhs.dtype))
                    found[key] = {"lhs": list(lhs.shape), "rhs": list(rhs.shape), "dtype": str(lhs.dtype),
                                  "dimension_numbers": dn}
            stack.extend(_sub_jaxprs(eqn.params))
    return list(found.values())


def isolate(convs: list[dict], repeats: int) -> list[dict]:
    """Returns, per 1x1 convolution, whether bf16 forward / gradients are finite and their error."""
    rows = []
    rng = np.random.default_rng(0)
    for conv in convs:
        dn = conv["dimension_numbers"]

        def f(x, w, dn=dn, precision=None):
            return jax.lax.conv_general_dilated(x, w, (1,) * (x.ndim - 2), "VALID", dimension_numbers=dn,
                                                precision=precision)

        x32 = jnp.asarray(rng.normal(size=conv["lhs"]).astype(np.float32))
        w32 = jnp.asarray((rng.normal(size=conv["rhs"]) * 0.1).astype(np.float32))
        y_shape = jax.eval_shape(f, x32, w32).shape
        g32 = jnp.asarray(rng.normal(size=y_shape).astype(np.float32))

        def fwd_bwd(x, w, g, precision=None, f=f):
            y, vjp = jax.vjp(lambda lhs, rhs: f(lhs, rhs, precision=precision), x, w)
            dx, dw = vjp(g)
            return y, dx, dw

        bf16 = jax.jit(fwd_bwd)
        ref = jax.jit(lambda x, w, g: fwd_bwd(x, w, g, jax.lax.Precision.HIGHEST))(x32, w32, g32)
        args = [a.astype(jnp.bfloat16) for a in (x32, w32, g32)]
        finite, errors = [], []
        for _ in range(repeats):
            out = bf16(*args)
            finite.append([bool(jnp.all(jnp.isfinite(o))) for o in out])
            errors.append([float(jnp.max(jnp.abs(o.astype(jnp.float32) - r)) / float(jnp.max(jnp.abs(r)) + 1e-30))
                           for o, r in zip(out, ref, strict=True)])
        row = {"lhs": conv["lhs"], "rhs": conv["rhs"], "finite_y_dx_dw": finite,
               "max_rel_error_y_dx_dw": errors[-1],
               "repeat_identical": all(e == errors[0] for e in errors)}
        print("isolate", row["lhs"], row["rhs"], "finite", finite[-1], "rel err", [f"{e:.2e}" for e in errors[-1]],
              flush=True)
        rows.append(row)
    return rows


_CUSTOM_CALL = re.compile(r'custom_call_target="(__cudnn\$conv[A-Za-z]*)"')
_WINDOW = re.compile(r"window=\{size=([0-9x]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ALGO = re.compile(r'"algorithm":\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}')


def cudnn_pointwise_calls(hlo_text: str) -> list[dict]:
    """Returns the cuDNN convolution custom calls with a 1x1(x1) window in optimised HLO text."""
    calls = []
    for line in hlo_text.splitlines():
        target = _CUSTOM_CALL.search(line)
        window = _WINDOW.search(line)
        if not target or not window or set(window.group(1).split("x")) != {"1"}:
            continue
        op = _OP_NAME.search(line)
        algo = _ALGO.search(line)
        shape = line.split("=", 1)[1].strip().split(" custom-call(")[0]
        calls.append({"target": target.group(1), "result": shape[:160],
                      "op_name": op.group(1) if op else "", "algorithm": algo.group(1) if algo else ""})
    return calls


def step_run(args, donate: bool, dump: pathlib.Path) -> dict:
    """Runs tools.diagnose_nonfinite in a child with HLO and autotune dumps; returns its report."""
    dump.mkdir(parents=True, exist_ok=True)
    report_file = dump / "report.json"
    flags = (f"--xla_dump_to={dump}/hlo --xla_dump_hlo_module_re=.*train_step.* "
             f"--xla_gpu_dump_autotune_results_to={dump}/autotune.textproto")
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    cmd = [sys.executable, "-m", "tools.diagnose_nonfinite", "--dtype", "bfloat16", "--patch", args.patch,
           "--steps", str(args.steps), "--json", str(report_file),
           "--overrides", ",".join(f"{k}={v}" for k, v in BASELINE_FORMS.items())] + ([] if donate else ["--no-donate"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    report = json.loads(report_file.read_text()) if report_file.exists() else {"returncode": proc.returncode}
    optimised = sorted((dump / "hlo").glob("*after_optimizations.txt"))
    calls = []
    for path in optimised:
        calls.extend(cudnn_pointwise_calls(path.read_text()))
    autotune = dump / "autotune.textproto"
    return {"donate": donate, "report": report, "hlo_files": [p.name for p in optimised],
            "pointwise_cudnn_calls": calls,
            "autotune_results_bytes": autotune.stat().st_size if autotune.exists() else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tag", default="local")
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="isolate,step")
    parser.add_argument("--out", default="", help="folder for the HLO / autotune dumps (default: a temporary one)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    result: dict = {"environment": environment(), "args": vars(args)}
    config = base_config()
    config.model.name, config.model.dtype = "elanres_msca_unet", "bfloat16"
    config.model.features = (16, 32, 64, 128, 256)
    config.model.update(BASELINE_FORMS)
    if "isolate" in parts:
        model = build_model(config.model)
        patch = tuple(int(v) for v in args.patch.split(","))
        x = jnp.zeros((args.batch, *patch, 1), jnp.float32)
        variables = jax.eval_shape(
            lambda: init_variables(model, jax.random.key(0), patch, dropout_rng=jax.random.key(1)))
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                        rngs={"dropout": jax.random.key(2)}))(variables, x)
        convs = pointwise_convs(jaxpr.jaxpr)
        print(f"{len(convs)} distinct 1x1 convolutions in the train forward", flush=True)
        result["isolate"] = isolate(convs, args.repeats)
    if "step" in parts:
        out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bf16_nan_"))
        result["step"] = [step_run(args, donate, out / ("donate" if donate else "no_donate"))
                          for donate in (True, False)]
        result["dump_dir"] = str(out)
    print("wrote", write_result(f"bf16_nan_{args.tag}", result))


if __name__ == "__main__":
    main()
