"""Where the JAX train step's device time goes: kernel time per step, grouped by kernel kind and
by the model layer that issued it.

    XLA_FLAGS=--xla_gpu_force_conv_nhwc=true python -m experiments.profile_train_step \
        --mode jax_bf16 --overrides depthwise_impl=shift,pointwise_impl=einsum --tag h100

Compiles the same step as `bench_train_step.py`, runs a few steps under `jax.profiler.trace`,
reads the Perfetto trace back and writes experiments/results/profile_train_step[_TAG].json:
  - `by_kind`: device milliseconds per step in convolutions, matrix products, reductions,
    elementwise fusions, copies/transposes and the rest (from kernel names);
  - `by_layer`: device milliseconds per step per model scope (from the name stack XLA keeps
    in each op's metadata, truncated to `--depth` scopes), forward and backward together;
  - `top_kernels` and `top_ops`: the largest single entries.
The raw trace is left under --trace-dir (copied to $OUT when set) for Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import shutil
import tempfile

from experiments import bench_train_step as bench
from experiments.bench_common import (
    RESULTS,
    enable_compilation_cache,
    environment,
    parse_overrides,
    write_json,
    write_result,
)

KIND_PATTERNS = (  # first match wins; kernel names from NCCL, cuDNN, cuBLAS, CUTLASS, Triton and XLA
    ("collective", re.compile(r"nccl|all-?reduce|all_reduce|all-?gather|all_gather|reduce-?scatter|reduce_scatter"
                              r"|collective|sendrecv", re.I)),  # before "reduction": ncclDevKernel_AllReduce_...
    # "conv" but not "convert": XLA names fusions after their ops (input_convert_reduce_fusion is a
    # reduction); before session 10 such fusions were counted as convolutions.
    ("convolution", re.compile(r"conv(?!ert)|xmma_fprop|xmma_dgrad|xmma_wgrad|implicit_gemm|cudnn|winograd", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|cublas|sm\d+_xmma|triton_gemm|ampere_|hopper_|dot", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy", re.I)),
    ("memset", re.compile(r"memset", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|triton|wrapped_", re.I)),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KIND_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(op_name: str, depth: int) -> str:
    """'jit(step)/jvp(UNet)/enc0/ELANResBlock/rep0/dense/conv/conv_general_dilated' -> scopes.

    Transformation wrappers (jvp(...), transpose(...), remat, ...) are dropped so the forward
    and backward ops of one layer land in one bucket."""
    parts = [p for p in op_name.split("/") if p and "(" not in p and p not in ("while", "body", "cond")]
    return "/".join(parts[:depth]) if parts else "(unnamed)"


def read_trace(trace_dir: pathlib.Path) -> list[dict]:
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz")) or sorted(trace_dir.rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no trace file under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


HLO_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
HLO_OP_NAME = re.compile(r'op_name="([^"]*)"')
HLO_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """{instruction name: JAX name stack} from an optimised HLO module's metadata.

    A fusion without metadata of its own takes the most common name stack inside the computation
    it calls. Keys are given both as in the HLO (`fusion.12`) and as kernel names (`fusion_12`)."""
    inside: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    named, calls = {}, {}
    computation = ""
    for line in hlo_text.splitlines():
        if (header := HLO_COMPUTATION.match(line)) and "=" not in line.split("(")[0]:
            computation = header.group(1)
            continue
        if not (instruction := HLO_INSTRUCTION.match(line)):
            continue
        name = instruction.group(1)
        if op_name := HLO_OP_NAME.search(line):
            named[name] = op_name.group(1)
            inside[computation][op_name.group(1)] += 1
        if called := HLO_CALLS.search(line):
            calls[name] = called.group(1)
    for name, computation in calls.items():
        if name not in named and inside[computation]:
            named[name] = inside[computation].most_common(1)[0][0]
    return {**{k.replace(".", "_"): v for k, v in named.items()}, **named}


def device_threads(events: list[dict]) -> tuple[set, dict]:
    """Returns the pids of the trace's GPUs and TPUs, and {(pid, tid): thread name} of all threads."""
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    return {pid for pid, name in process.items() if "GPU" in name or "TPU" in name}, thread


def is_kernel_line(line: str) -> bool:
    """Returns whether a device thread of the trace is a stream (its events are kernels)."""
    return line.startswith("Stream") or "stream" in line.lower()


def summarise(events: list[dict], steps: int, depth: int, op_names: dict[str, str]) -> dict:
    """Per-step device time by kernel kind, by layer (`depth` scopes; and every block: 2 scopes), by
    the operation a kernel computes (its full name stack, with launches per step), and the largest
    kernels and ops."""
    device_pids, thread = device_threads(events)
    kernels: collections.Counter = collections.Counter()
    kernel_count: collections.Counter = collections.Counter()
    blocks: collections.Counter = collections.Counter()
    op_time: collections.Counter = collections.Counter()
    op_count: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    layers: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    lines: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids:
            continue
        line = thread.get((e["pid"], e.get("tid")), "")
        dur_ms = float(e.get("dur", 0)) / 1e3
        lines[line] += dur_ms
        args = e.get("args", {})
        if is_kernel_line(line):
            kernels[e["name"]] += dur_ms
            kernel_count[e["name"]] += 1
            kinds[kernel_kind(e["name"])] += dur_ms
            hlo_op = str(args.get("hlo_op", ""))
            op_name = op_names.get(hlo_op) or op_names.get(e["name"]) or args.get("tf_op") or ""
            layers[layer_of(str(op_name), depth)] += dur_ms
            blocks[layer_of(str(op_name), 2)] += dur_ms
            op_time[str(op_name)] += dur_ms
            op_count[str(op_name)] += 1
        elif line == "XLA Ops":
            ops[e["name"]] += dur_ms
    per = lambda c, n=None: [  # noqa: E731
        {"name": k, "ms_per_step": v / steps} for k, v in c.most_common(n)
    ]
    return {
        "device_ms_per_step_by_line": {k: v / steps for k, v in lines.items()},
        "kernel_ms_per_step": sum(kinds.values()) / steps,
        "kernel_launches_per_step": sum(kernel_count.values()) / steps,
        "by_kind": per(kinds),
        "by_layer": per(layers, 60),
        "by_block": per(blocks),
        "by_op_name": [{**row, "launches_per_step": op_count[row["name"]] / steps} for row in per(op_time, 40)],
        "top_kernels": [{**row, "calls_per_step": kernel_count[row["name"]] / steps} for row in per(kernels, 40)],
        "top_ops": per(ops, 40),
    }


def resummarise(name: str, trace_dir: pathlib.Path, hlo: pathlib.Path | None, depth: int) -> None:
    """Rewrites the summary of results/`name`.json from the run's trace and optimised HLO."""
    path = RESULTS / f"{name}.json"
    payload = json.loads(path.read_text())
    hlo_text = "" if hlo is None else (gzip.open(hlo, "rt").read() if hlo.suffix == ".gz" else hlo.read_text())
    payload.update(summarise(read_trace(trace_dir), payload["steps"], depth, hlo_op_names(hlo_text)))
    payload["summarised_again"] = "from the run's trace, by a later version of this script"
    write_json(path, payload)
    print(f"kernel time {payload['kernel_ms_per_step']:.2f} ms/step: " +
          ", ".join(f"{row['name']} {row['ms_per_step']:.2f}" for row in payload["by_kind"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="elanres_msca_unet")
    parser.add_argument("--mode", default="jax_bf16", choices=("jax_f32", "jax_bf16"))
    parser.add_argument("--patch", default="48,256,256")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--depth", type=int, default=3, help="name-stack scopes kept per layer bucket")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--trace-dir", default="")
    parser.add_argument("--tag", default="")
    parser.add_argument("--resummarise", default="", metavar="TRACE_DIR",
                        help="recompute the summary of the --tag result file from the trace its run left "
                             "(after a change to this script's summary), with the run's --hlo")
    parser.add_argument("--hlo", default="", help="with --resummarise: the run's optimised_hlo.txt (or .gz)")
    args = parser.parse_args()
    name = "profile_train_step" + (f"_{args.tag}" if args.tag else "")
    if args.resummarise:
        resummarise(name, pathlib.Path(args.resummarise), pathlib.Path(args.hlo) if args.hlo else None, args.depth)
        return
    import jax

    bench.OVERRIDES.update(parse_overrides(args.overrides))
    patch = tuple(int(v) for v in args.patch.split(","))
    enable_compilation_cache()
    lowered, state, batch = bench.lower_jax_step(args.variant, args.mode, patch, args.batch)
    step = lowered.compile()
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = pathlib.Path(args.trace_dir or tempfile.mkdtemp(prefix="livseg_trace_"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(args.steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    hlo_text = step.as_text()
    (trace_dir / "optimised_hlo.txt").write_text(hlo_text)
    summary = summarise(read_trace(trace_dir), args.steps, args.depth, hlo_op_names(hlo_text))
    loss = float(metrics["loss"])
    payload = {"benchmark": "profile_train_step", "variant": args.variant, "mode": args.mode,
               "overrides": bench.OVERRIDES, "patch": patch, "batch": args.batch, "steps": args.steps,
               "loss": loss, "environment": environment(), **summary}
    path = write_result(name, payload)
    if os.environ.get("OUT"):
        shutil.copytree(trace_dir, pathlib.Path(os.environ["OUT"], name + "_trace"), dirs_exist_ok=True)
    print(f"kernel time {summary['kernel_ms_per_step']:.1f} ms/step, loss {loss:.4f}")
    for row in summary["by_kind"]:
        print(f"  {row['name']:20s} {row['ms_per_step']:7.2f} ms")
    print("by layer:")
    for row in summary["by_layer"][:25]:
        print(f"  {row['name'][:70]:70s} {row['ms_per_step']:7.2f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
