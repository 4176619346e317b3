"""Merges XLA autotuning dumps into the results the package ships (livseg_jax/autotune/).

Run on the GPU the results are for, with the package versions they are for:

    XLA_FLAGS=--xla_gpu_dump_autotune_results_to=/tmp/liver.textproto \\
        python -m livseg_jax.train --config=configs/liver.py:paper ...    # one dump per process
    python -m tools.ship_autotune_results /tmp/liver.textproto /tmp/tumor.textproto \\
        --programs "configs/liver.py:paper train" "configs/tumor.py train"

XLA writes a process's whole autotuning cache after each compile, so the last dump of a process
holds every program it compiled. The results are merged with those already shipped for the same
versions (other GPU models, other programs) into `xla_autotune_<jaxlib>.textproto`, and the
manifest records the versions (`livseg_jax.xla_flags.runtime_versions`), the GPUs and the
programs. Writing the text format by hand (top-level blocks, one per result, deduplicated) needs
no protobuf classes: jaxlib does not expose XLA's `AutotuneResults` message to Python.
"""

from __future__ import annotations

import argparse
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


def merge_autotune_results(texts: list[str]) -> str:
    """Returns one text proto holding every distinct top-level block of `texts` (first seen first).

    Raises ValueError when the texts' scalar fields (the format `version`) differ.
    """
    header, merged, seen = None, [], set()
    for text in texts:
        scalars, blocks = top_level_blocks(text)
        if header is None:
            header = scalars
        elif scalars != header:
            raise ValueError(f"autotuning results of different formats: {header} and {scalars}")
        for block in blocks:
            key = " ".join(block.split())  # the same result however it is indented
            if key not in seen:
                seen.add(key)
                merged.append(block)
    return "\n".join([*(header or []), *merged]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+", type=pathlib.Path, help="files --xla_gpu_dump_autotune_results_to wrote")
    parser.add_argument("--programs", nargs="+", required=True, help="what the dumps were made from")
    parser.add_argument("--devices", nargs="+", default=None, help="GPU names (default: this machine's)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=SHIPPED_AUTOTUNE_DIR)
    args = parser.parse_args()
    versions = runtime_versions()
    if args.devices is None:
        import jax

        args.devices = sorted({d.device_kind for d in jax.devices("gpu")})
    manifest_path = args.out_dir / AUTOTUNE_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"files": []}
    name = f"xla_autotune_{versions['jaxlib']}.textproto"
    previous = next((e for e in manifest["files"] if e["versions"] == versions), None)
    texts = [p.read_text() for p in args.dumps]
    if previous is not None:  # keep what other GPUs and programs contributed
        texts.insert(0, (args.out_dir / previous["file"]).read_text())
        name = previous["file"]
    merged = merge_autotune_results(texts)
    entry = {"file": name, "versions": versions,
             "devices": sorted(set(args.devices) | set(previous["devices"] if previous else [])),
             "programs": sorted(set(args.programs) | set(previous["programs"] if previous else []))}
    manifest["files"] = [e for e in manifest["files"] if e is not previous] + [entry]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.out_dir / name, merged)
    write_json(manifest_path, manifest)
    print(f"{args.out_dir / name}: {len(top_level_blocks(merged)[1])} results, {len(merged) / 1e6:.2f} MB; "
          f"versions {versions}; GPUs {entry['devices']}")


if __name__ == "__main__":
    main()
