"""Merges XLA autotuning dumps into the results the package ships (livseg_jax/autotune/).

Run on the GPU the results are for, with the package versions they are for:

    XLA_FLAGS=--xla_gpu_dump_autotune_results_to=/tmp/liver.textproto \\
        python -m livseg_jax.train --config=configs/liver.py:paper ...    # one dump per process
    python -m tools.ship_autotune_results /tmp/liver.textproto /tmp/tumor.textproto \\
        --programs "configs/liver.py:paper train" "configs/tumor.py train"

XLA writes a process's whole autotuning cache after each compile, so the last dump of a process
holds every program it compiled. The results are merged with those already shipped for the same
versions (other GPU models, other programs; `--replace` drops those instead, after a change to the
programs), one result per key (the first kept), into
`xla_autotune_<jaxlib>_<hash of the versions>.textproto`; the manifest records the versions
(`livseg_jax.xla_flags.runtime_versions`), the GPUs and the programs. Writing the text format by
hand (top-level blocks, one per result) needs no protobuf classes: jaxlib does not expose XLA's
`AutotuneResults` message to Python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re

from livseg_jax.atomic_write import write_json, write_text
from livseg_jax.xla_flags import AUTOTUNE_MANIFEST, SHIPPED_AUTOTUNE_DIR, runtime_versions


def top_level_blocks(text: str) -> tuple[list[str], list[str]]:
    """Splits an autotuning results text proto into (scalar lines, `name { ... }` blocks): XLA's
    older `results { ... }` or jaxlib 0.11's `entries { key { target { device hlo_fingerprint } ...}
    value { optimal_config ... } }`.

    Braces inside quoted strings (the fused computations' HLO) do not count.
    """
    scalars, blocks = [], []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        match = re.compile(r"\w+\s*\{").match(text, i)
        if not match:  # a scalar field such as `version: 3`
            end = text.find("\n", i)
            end = n if end < 0 else end
            scalars.append(text[i:end].strip())
            i = end
            continue
        depth, j, quote = 0, match.end() - 1, None
        while j < n:
            c = text[j]
            if quote:
                if c == "\\":
                    j += 1
                elif c == quote:
                    quote = None
            elif c in "\"'":
                quote = c
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth:
            raise ValueError("unbalanced braces in an autotuning results text proto")
        blocks.append(text[i:j + 1])
        i = j + 1
    return scalars, blocks


def result_key(block: str) -> str:
    """Returns what a result is for: its block without the chosen kernel (jaxlib 0.11's `value { }`,
    the older format's `result { }`), white space collapsed."""
    inner = block[block.index("{") + 1: block.rindex("}")]
    _, children = top_level_blocks(inner)
    for child in children:
        if re.match(r"(value|result)\s*\{", child):
            inner = inner.replace(child, "")
    return " ".join(inner.split())


def merge_autotune_results(texts: list[str]) -> tuple[str, int]:
    """Returns (one text proto with one result per key of `texts`, the first seen; how many later
    results for a key already seen chose another kernel). Two autotuning runs may time two kernels
    within noise of each other and pick differently; XLA would take either.

    Raises ValueError when the texts' scalar fields (the format `version`) differ.
    """
    header, merged, seen, conflicts = None, [], {}, 0
    for text in texts:
        scalars, blocks = top_level_blocks(text)
        if header is None:
            header = scalars
        elif scalars != header:
            raise ValueError(f"autotuning results of different formats: {header} and {scalars}")
        for block in blocks:
            key, whole = result_key(block), " ".join(block.split())
            if key not in seen:
                seen[key] = whole
                merged.append(block)
            elif seen[key] != whole:
                conflicts += 1
    return "\n".join([*(header or []), *merged]) + "\n", conflicts


def results_file_name(versions: dict[str, str]) -> str:
    """Returns the shipped file's name for `versions`: one per build (jaxlib, CUDA plugin, cuDNN)."""
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:8]
    return f"xla_autotune_{versions.get('jaxlib', 'unknown')}_{digest}.textproto"


def ship_results(out_dir: pathlib.Path, dumps: list[str], programs: list[str], devices: list[str],
                 versions: dict[str, str], replace: bool = False) -> tuple[pathlib.Path, int, int, list[str]]:
    """Merges the `dumps` (texts) into `out_dir`'s results for `versions` and its manifest; returns
    (the file, its results, how many conflicting later results were dropped, the file's GPUs).

    With `replace`, the results already shipped for these versions are dropped instead of merged:
    after a change to the programs, results for fusions that no longer exist would otherwise stay.
    """
    manifest_path = out_dir / AUTOTUNE_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": []}
    name = results_file_name(versions)
    previous = next((e for e in manifest["files"] if e["versions"] == versions), None)
    texts = list(dumps)
    kept = previous if previous is not None and not replace else None
    if kept is not None:  # keep what other GPUs and programs contributed
        texts.insert(0, (out_dir / kept["file"]).read_text())
        name = kept["file"]
    merged, conflicts = merge_autotune_results(texts)
    entry = {"file": name, "versions": versions,
             "devices": sorted(set(devices) | set(kept["devices"] if kept else [])),
             "programs": sorted(set(programs) | set(kept["programs"] if kept else []))}
    manifest["files"] = [e for e in manifest["files"] if e is not previous] + [entry]
    out_dir.mkdir(parents=True, exist_ok=True)
    if previous is not None and previous["file"] != name:
        (out_dir / previous["file"]).unlink(missing_ok=True)
    write_text(out_dir / name, merged)
    write_json(manifest_path, manifest)
    return out_dir / name, len(top_level_blocks(merged)[1]), conflicts, entry["devices"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+", type=pathlib.Path, help="files --xla_gpu_dump_autotune_results_to wrote")
    parser.add_argument("--programs", nargs="+", required=True, help="what the dumps were made from")
    parser.add_argument("--devices", nargs="+", default=None, help="GPU names (default: this machine's)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=SHIPPED_AUTOTUNE_DIR)
    parser.add_argument("--replace", action="store_true",
                        help="drop the results shipped for these versions instead of merging into them (after a "
                             "change to the programs: results of fusions that no longer exist go)")
    args = parser.parse_args()
    versions = runtime_versions()
    if args.devices is None:
        import jax

        args.devices = sorted({d.device_kind for d in jax.devices("gpu")})
    path, count, conflicts, devices = ship_results(args.out_dir, [p.read_text() for p in args.dumps], args.programs,
                                          args.devices, versions, args.replace)
    print(f"{path}: {count} results, {path.stat().st_size / 1e6:.2f} MB ({conflicts} later results for a key "
          f"already kept chose another kernel and were dropped); versions {versions}; GPUs {devices}")


if __name__ == "__main__":
    main()
