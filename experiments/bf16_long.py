"""Long bf16 against float32 training on the real shared cases (issue 21 target 1).

Trains the liver stage of `configs/liver.py:fewshot` twice with the same seed, split and data,
once with `model.dtype=bfloat16` and once with `float32`, through the user's command
(`python -m livseg_jax.train`), and records the training loss, the validation Dice curve, whether
every step stayed finite, and the wall time of each. With two or more GPUs visible the two runs
train at the same time, one per GPU (`CUDA_VISIBLE_DEVICES`); otherwise one after the other.

    python -m experiments.bf16_long --cases runs/real_data/cases --tag h200 [--steps 5000]
        [--patch 48,192,192] [--eval-every 500]
    python -m experiments.bf16_long --plot experiments/results/bf16_long_h200.json   # the PNG
    python -m experiments.bf16_long --cases DIR --tag cpu --steps 4 --patch 16,32,32 --smoke

`--cases` is a folder of `<id>.nii.gz` + `<id>_label.nii.gz` pairs (what
`python -m experiments.real_data --prepare-only` writes from `../shared/data`). The list file puts
`--val` last, so the training split holds it out (`data.num_val_cases=1`). Writes
experiments/results/bf16_long_<tag>.json (`--smoke`: under the workdir only); `--plot` draws
the curves next to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

from experiments.bench_common import REPO, RESULTS, environment
from livseg_jax.atomic_write import atomic_path, write_json

DTYPES = ("bfloat16", "float32")


def write_list(cases: pathlib.Path, val: str, out: pathlib.Path) -> list[str]:
    """Writes the list file (validation case last) and returns the case ids in its order."""
    ids = sorted(p.name[: -len("_label.nii.gz")] for p in cases.glob("*_label.nii.gz"))
    if val not in ids:
        raise SystemExit(f"error: {cases}: no case {val!r} (found {ids})")
    ids = [i for i in ids if i != val] + [val]
    lines = [f"{(cases / f'{i}.nii.gz').resolve()} {(cases / f'{i}_label.nii.gz').resolve()}" for i in ids]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return ids


def train_command(args: argparse.Namespace, dtype: str, list_file: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    steps_per_epoch = min(args.eval_every, args.steps)
    config = "configs/liver.py" if args.smoke else "configs/liver.py:fewshot"
    overrides = {
        "model.dtype": dtype,
        "data.layout": "list", "data.root": "", "data.list_file": str(list_file),
        "data.num_val_cases": 1,
        "data.patch_size": f"({args.patch})",
        "data.cache_dir": str(workdir.parent / f"cache_{dtype}"),
        "train.steps_per_epoch": steps_per_epoch,
        "train.num_epochs": -(-args.steps // steps_per_epoch),
        "train.eval_every_epochs": 1,
        "train.checkpoint_every_epochs": 2,
        "train.keep_checkpoints": 1,
        "seed": args.seed,
    }
    return [sys.executable, "-m", "livseg_jax.train", f"--config={config}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in overrides.items()]


def summarise(workdir: pathlib.Path, returncode: int, wall_s: float, log: pathlib.Path) -> dict:
    from livseg_jax.training.logging import read_metrics

    records = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    finite = returncode == 0 and all(abs(r["loss"]) < float("inf") and r["loss"] == r["loss"] for r in train)
    tail = log.read_text().splitlines()[-5:] if log.exists() else []
    return {
        "returncode": returncode, "finite": finite, "wall_s": round(wall_s, 1),
        "final_step": train[-1]["step"] if train else 0,
        "steps_per_s": sorted(r["steps_per_sec"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1 else None,
        "train": [{k: r[k] for k in ("step", "loss", "loss_final_head", "grad_norm") if k in r} for r in train],
        "val": [{"step": r["step"], "dice": r["dice"]} for r in val],
        "final_val_dice": val[-1]["dice"] if val else None,
        "best_val_dice": max((r["dice"] for r in val), default=None),
        "log_tail": tail if returncode else [],
    }


def run(args: argparse.Namespace) -> pathlib.Path:
    import jax  # only to count the GPUs; the trainings run in their own processes

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    work = pathlib.Path(args.workdir).resolve()
    list_file = work / "cases.txt"
    ids = write_list(pathlib.Path(args.cases), args.val, list_file)
    env_base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {}
    started = {}
    parallel = len(gpus) >= 2
    print(f"bf16_long: {len(gpus)} GPU(s); the two runs go {'side by side' if parallel else 'one after the other'}",
          flush=True)
    results = {}
    for index, dtype in enumerate(DTYPES):
        workdir = work / f"liver_{dtype}"
        log = work / f"{dtype}.log"
        env = dict(env_base)
        if parallel:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[index].id)
        cmd = train_command(args, dtype, list_file, workdir)
        print(" ".join(cmd), flush=True)
        started[dtype] = time.perf_counter()
        procs[dtype] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        if not parallel:
            procs[dtype].wait()
            results[dtype] = summarise(workdir, procs[dtype].returncode, time.perf_counter() - started[dtype], log)
    for dtype, proc in procs.items():
        if dtype not in results:
            proc.wait()
            results[dtype] = summarise(work / f"liver_{dtype}", proc.returncode,
                                       time.perf_counter() - started[dtype], work / f"{dtype}.log")
    for dtype, r in results.items():
        print(f"{dtype}: rc {r['returncode']}, finite {r['finite']}, {r['final_step']} steps in {r['wall_s']} s, "
              f"{r['steps_per_s']} steps/s, final val Dice {r['final_val_dice']}, best {r['best_val_dice']}",
              flush=True)
    result = {
        "benchmark": "bf16_long",
        "settings": {"config": "configs/liver.py:fewshot", "steps": args.steps, "patch": args.patch,
                     "eval_every": args.eval_every, "seed": args.seed, "cases": ids, "val": args.val,
                     "side_by_side": parallel},
        "environment": environment(),
        "runs": results,
    }
    out = (work if args.smoke else RESULTS) / f"bf16_long_{args.tag}.json"
    write_json(out, result)
    print(f"wrote {out}")
    return out


def plot(path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4))
    for dtype, r in result["runs"].items():
        ax_loss.plot([t["step"] for t in r["train"]], [t["loss"] for t in r["train"]], label=dtype)
        ax_dice.plot([v["step"] for v in r["val"]], [v["dice"] for v in r["val"]], "o-", label=dtype)
    s = result["settings"]
    ax_loss.set(xlabel="step", ylabel="training loss (deep supervision)", yscale="log",
                title=f"liver stage, {s['config']}, patch {s['patch']}")
    ax_dice.set(xlabel="step", ylabel="validation liver Dice", ylim=(0, 1), title=f"held-out case {s['val']}")
    for ax in (ax_loss, ax_dice):
        ax.legend()
    fig.tight_layout()
    out = path.with_suffix(".png")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    print(f"wrote {out}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=str(REPO / "runs" / "real_data" / "cases"))
    p.add_argument("--val", default="lits-117", help="the held-out validation case id")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--patch", default="48,192,192")
    p.add_argument("--eval-every", type=int, default=500, help="steps between validations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="h200")
    p.add_argument("--workdir", default=str(REPO / "runs" / "bf16_long"))
    p.add_argument("--smoke", action="store_true", help="the CPU demo config, results under --workdir")
    p.add_argument("--plot", type=pathlib.Path, help="draw the PNG of a result JSON and exit")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return 0
    out = run(args)
    result = json.loads(out.read_text())
    return 0 if all(r["returncode"] == 0 for r in result["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
