"""Peak memory and time of ONNX Runtime prediction with and without its CPU memory arena.

`inference.backends.onnx_session` turns the arena off. This predicts one CT with the same two
exported stages in two fresh processes, arena on and arena off (the order alternates over
`--repeats`), pinned to `--cpus`, and records each process's peak resident set (`ru_maxrss`), the
wall time of `predict_file`, and whether the label maps are identical.

    python -m experiments.bench_predict_cpu --cpus 0,1 --warm-runs 0 --tag 2core   # exports the stages
    python -m experiments.bench_ort_arena --onnx-dir /tmp/livseg_bench_predict_cpu/livseg_cache/onnx \\
        --ct /tmp/livseg_bench_predict_cpu/ct/volume-17.nii.gz --cpus 0,1 --tag 2core

Writes experiments/results/bench_ort_arena_<tag>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import tempfile
import time

from experiments.bench_common import environment, print_result, run_child, write_result


def child(onnx_dir: str, ct: str, out: str, arena: bool) -> dict:
    """Predicts `ct` into `out` with the stages in `onnx_dir`; returns wall seconds and peak RSS."""
    import onnxruntime as ort

    from livseg_jax.inference import backends

    plain = ort.InferenceSession

    def session(path, sess_options=None, providers=None):  # the shipped options, arena as asked
        sess_options = sess_options or ort.SessionOptions()
        sess_options.enable_cpu_mem_arena = arena
        return plain(path, sess_options=sess_options, providers=providers)

    ort.InferenceSession = session
    stages = {}
    for path in sorted(pathlib.Path(onnx_dir).glob("*.onnx")):
        metadata = plain(str(path)).get_modelmeta().custom_metadata_map
        stages[json.loads(metadata[backends.CONFIG_KEY])["stage"]] = path
    predictor = backends.onnx_predictor(liver=stages["liver"], tumor=stages["tumor"])
    start = time.perf_counter()
    predictor.predict_file(ct, out)
    return {"arena": arena, "predict_s": round(time.perf_counter() - start, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", required=True, help="a folder holding the liver and tumour .onnx exports")
    parser.add_argument("--ct", required=True)
    parser.add_argument("--cpus", default="", help="pin each process to these cores, e.g. 0,1")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tag", default="local")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(child(args.onnx_dir, args.ct, args.out, args.child == "on"))
        return
    cpus = [int(c) for c in args.cpus.split(",") if c] or None
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_ort_arena_"))
    rows = []
    for repeat in range(args.repeats):
        for mode in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
            out = work / f"{mode}_{repeat}.nii.gz"
            row = run_child("experiments.bench_ort_arena", ["--child", mode, "--onnx-dir", args.onnx_dir,
                                                            "--ct", args.ct, "--out", str(out)], cpus=cpus)
            if "error" in row:
                raise SystemExit(f"arena {mode}: {row['error']}")
            rows.append({"repeat": repeat, **row, "output": str(out)})
    import nibabel as nib
    import numpy as np

    labels = [np.asarray(nib.load(r["output"]).dataobj) for r in rows]
    identical = all(np.array_equal(labels[0], other) for other in labels[1:])
    payload = {"benchmark": "ort_arena", "ct": args.ct, "cpus": cpus, "rows": rows, "labels_identical": identical,
               "environment": environment()}
    path = write_result(f"bench_ort_arena_{args.tag}", payload)
    print("| ONNX Runtime CPU arena | predict_file s | peak RSS GiB |\n|---|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['arena'] else 'off'} | {r['predict_s']} | {r['peak_rss_gib']} |")
    print(f"label maps identical: {identical}; wrote {path}")


if __name__ == "__main__":
    main()
