"""Merges result files of one benchmark, written by separate runs on one machine, into one record.

    python -m tools.merge_results experiments/results/bench_split_step_h200_s12_forms.json \\
        experiments/results/bench_split_step_h200_s12_base_a.json ... [--remove-inputs]

A comparison measured as several invocations in one device call (one per XLA flag, say) is one
study: its rows belong in one file (experiments/results/README.md keeps one file per study). Each
row keeps its run's environment and names the file it came from; the inputs' other top-level
fields must agree, or the merge is refused rather than one of them silently dropped.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from livseg_jax.atomic_write import write_json

# Per-run fields: each row keeps its own; they need not agree between the inputs.
PER_RUN = ("environment", "rows", "overrides", "steps", "step_programs")


def merge_results(payloads: dict[str, dict]) -> dict:
    """Returns one result from {source name: result}; raises ValueError when the inputs' shared
    fields (the benchmark, the config, ...) differ."""
    shared: dict = {}
    rows, sources = [], []
    for name, payload in payloads.items():
        for key, value in payload.items():
            if key in PER_RUN or key == "merged_from":
                continue
            if key in shared and shared[key] != value:
                raise ValueError(f"{name}: {key} is {value!r}, another input has {shared[key]!r}")
            shared.setdefault(key, value)
        run = {key: payload[key] for key in PER_RUN if key in payload and key != "rows"}
        # A row of an input that is itself a merge keeps the run it names.
        rows.extend({**row, **run, "source": row.get("source", name)} for row in payload.get("rows", []))
        sources.extend(payload.get("merged_from", [name]))
    return {**shared, "merged_from": sources, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("inputs", nargs="+", type=pathlib.Path)
    parser.add_argument("--remove-inputs", action="store_true")
    args = parser.parse_args()
    payloads = {path.stem: json.loads(path.read_text()) for path in args.inputs}
    try:
        merged = merge_results(payloads)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    write_json(args.out, merged)
    if args.remove_inputs:
        for path in args.inputs:
            if path.resolve() != args.out.resolve():
                path.unlink()
    print(f"{args.out}: {len(merged['rows'])} rows from {len(payloads)} files")


if __name__ == "__main__":
    main()
