"""tools/merge_results: one study's runs in one file, each row naming its run."""

import json

import pytest

from tools.merge_results import merge_results


def test_rows_keep_their_run_and_shared_fields_must_agree(tmp_path):
    a = {"benchmark": "split_step", "config": "c", "environment": {"host": 1}, "overrides": "", "rows": [{"x": 1}]}
    b = {"benchmark": "split_step", "config": "c", "environment": {"host": 2}, "overrides": "k=v",
         "rows": [{"x": 2}, {"x": 3}]}
    merged = merge_results({"a": a, "b": b})
    assert merged["benchmark"] == "split_step" and merged["merged_from"] == ["a", "b"]
    assert [(r["x"], r["source"], r["environment"]["host"], r["overrides"]) for r in merged["rows"]] == [
        (1, "a", 1, ""), (2, "b", 2, "k=v"), (3, "b", 2, "k=v")]
    json.dumps(merged)
    # bench_train_step's --step-programs is a setting of the run, as the overrides are.
    programs = merge_results({"one": {**a, "step_programs": 1}, "two": {**b, "step_programs": 2}})
    assert [r["step_programs"] for r in programs["rows"]] == [1, 2, 2] and "step_programs" not in programs
    # A merge of merges keeps each row's run and every run's name.
    again = merge_results({"ab": merged, "c": {**b, "rows": [{"x": 4}]}})
    assert [r["source"] for r in again["rows"]] == ["a", "b", "b", "c"] and again["merged_from"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="config"):
        merge_results({"a": a, "c": {**b, "config": "other"}})
