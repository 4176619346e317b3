"""A study's results as tables laid out like the publication's: Markdown, CSV and JSON.

Each run's numbers (`run_metrics`) come from `livseg_jax.evaluate`'s summary of its test-split
predictions (`summarize_cases`), so a table cell equals what `python -m livseg_jax.evaluate`
prints for the same predictions. Published values stand in a column beside ours; a cell the
publication does not give stays empty.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from livseg_jax import atomic_write
from livseg_jax.evaluate import STRUCTURES, jsonable
from livseg_jax.metrics import METRIC_NAMES

# Metric keys a table column may name. "<structure>.<metric>": the mean over test cases as in
# `evaluate`'s summary; "dice_mean" / "mean_iou": the mean of the liver and tumour values;
# "size_high_mm" / "size_low_mm": the tumour-size table's groups (tumour Dice >= / < threshold);
# parameters (all stages together), training seconds (all stages), test seconds per case.
METRIC_KEYS = (
    *(f"{s}.{m}" for s in STRUCTURES for m in METRIC_NAMES),
    *(f"{s}.global_dice" for s in STRUCTURES),
    "dice_mean", "mean_iou",
    "size_high_mm", "size_low_mm", "size_high_cases", "size_low_cases",
    "lesions_hit", "lesions_true",
    "params", "train_s", "test_s_per_case",
)


def run_metrics(summary: Mapping[str, Any], params: int, train_s: float, test_s_per_case: float) -> dict[str, Any]:
    """Returns a run's flat {metric key: value} from `evaluate.summarize_cases` output and its costs."""
    out: dict[str, Any] = {}
    for s in STRUCTURES:
        for m in METRIC_NAMES:
            out[f"{s}.{m}"] = summary[s][m]["mean"]
            out[f"{s}.{m}.std"] = summary[s][m]["std"]
        out[f"{s}.global_dice"] = summary[s].get("global_dice", math.nan)
    out["dice_mean"] = (out["liver.dice"] + out["tumor.dice"]) / 2
    out["mean_iou"] = (out["liver.iou"] + out["tumor.iou"]) / 2
    groups = summary["tumor_size"]["groups"]
    threshold = summary["tumor_size"]["threshold"]
    for name, group in ((f"dice>={threshold:g}", "high"), (f"dice<{threshold:g}", "low")):
        out[f"size_{group}_mm"] = groups[name]["mean_major_axis_mm"]
        out[f"size_{group}_cases"] = groups[name]["n_cases"]
    out["lesions_hit"] = summary["lesions"]["n_hit"]
    out["lesions_true"] = summary["lesions"]["n_true"]
    out["params"] = int(params)
    out["train_s"] = float(train_s)
    out["test_s_per_case"] = float(test_s_per_case)
    return out


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _published(value: Any, digits: int) -> str:
    # `check_study` made sure the column's digits show the value exactly as published.
    return "" if value is None else f"{value:.{digits}f}"


def table_rows(spec: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Returns one dict per table row: run, then per column "<label>" (ours) and "<label> (published)"."""
    rows = []
    for name in spec["rows"]:
        row: dict[str, Any] = {"run": name}
        ours = results.get(name)
        for col in spec["columns"]:
            row[col["label"]] = None if ours is None else ours.get(col["key"])
            row[f"{col['label']} (published)"] = col["published"].get(name)
        rows.append(row)
    return rows


def markdown_table(spec: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]) -> str:
    """Returns one study table as Markdown: ours and the published value side by side per metric."""
    head = ["run"]
    for col in spec["columns"]:
        head += [col["label"], "published"]
    lines = [f"## {spec['title']}", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in table_rows(spec, results):
        cells = [row["run"] + ("" if row["run"] in results else " (not run)")]
        for col in spec["columns"]:
            published = row[f"{col['label']} (published)"]
            cells += [_cell(row[col["label"]], col["digits"]), _published(published, col["digits"])]
        lines.append("| " + " | ".join(cells) + " |")
    if spec.get("note"):
        lines += ["", spec["note"]]
    return "\n".join(lines)


def markdown_document(header: Mapping[str, Any], tables: Sequence[Mapping[str, Any]],
                      results: Mapping[str, Mapping[str, Any]]) -> str:
    """Returns tables.md: a header (study, data, split, scale, device, commit) and every table."""
    lines = [f"# Study `{header['study']}`, scale `{header['scale']}`", ""]
    if header.get("description"):
        lines += [header["description"], ""]
    for key in ("data", "split", "scale_settings", "device", "commit", "written"):
        lines.append(f"- {key.replace('_', ' ')}: {header[key]}")
    missing = [t for spec in tables for t in spec["rows"] if t not in results]
    if missing:
        lines.append(f"- runs without results yet (empty rows): {', '.join(dict.fromkeys(missing))}")
    lines += ["", "Ours: the mean over the test cases (`livseg_jax.evaluate`); ASD in mm; training time in "
              "seconds for all stages; test time in seconds per case. Published: the value the publication "
              "reports (empty where it gives none).", ""]
    for spec in tables:
        lines += [markdown_table(spec, results), ""]
    return "\n".join(lines)


def tables_csv(tables: Sequence[Mapping[str, Any]], results: Mapping[str, Mapping[str, Any]]) -> str:
    """Returns every table in one CSV: table, run, column, ours, published (one row per cell pair)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "run", "column", "metric", "ours", "published"])
    for spec in tables:
        for row in table_rows(spec, results):
            for col in spec["columns"]:
                ours = row[col["label"]]
                ours = "" if ours is None or (isinstance(ours, float) and math.isnan(ours)) else ours
                published = row[f"{col['label']} (published)"]
                writer.writerow([spec["id"], row["run"], col["label"], col["key"], ours,
                                 "" if published is None else published])
    return buffer.getvalue()


def write_tables(out_dir: str | os.PathLike, header: Mapping[str, Any], tables: Sequence[Mapping[str, Any]],
                 results: Mapping[str, Mapping[str, Any]]) -> dict[str, pathlib.Path]:
    """Returns the paths of tables.md, tables.csv and tables.json after writing them atomically."""
    out_dir = pathlib.Path(out_dir)
    paths = {"md": out_dir / "tables.md", "csv": out_dir / "tables.csv", "json": out_dir / "tables.json"}
    atomic_write.write_text(paths["md"], markdown_document(header, tables, results))
    atomic_write.write_text(paths["csv"], tables_csv(tables, results))
    report = {"header": dict(header), "results": results,
              "tables": [{**dict(spec), "cells": table_rows(spec, results)} for spec in tables]}
    atomic_write.write_json(paths["json"], jsonable(report))
    return paths
