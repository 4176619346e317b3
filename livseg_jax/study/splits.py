"""Deterministic train / validation / test splits, saved in the study directory and reused.

The paper's protocol on LiTS: 20 test cases, the other 111 split 3:1 into training and validation
(`val_fraction` 0.25). The case ids are sorted, shuffled with `numpy.random.default_rng(seed)`;
the first `test_cases` are the test split, the rest train + validation: the last
`round(val_fraction * n)` of them validate, or with `folds` = K >= 2 fold `fold` of K near-equal
contiguous folds validates (k-fold cross-validation over train + validation, the test split fixed).
The shuffle and the folds are `livseg_jax.data.folds`' (`shuffled_cases`, `contiguous_folds`), the
one k-fold rule that `livseg_jax.train --config.data.num_folds` uses too.

`split.json` records the settings, the case ids and the split; a study directory keeps its first
split: rerunning with other cases or settings is refused (`load_or_create`).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from livseg_jax import atomic_write
from livseg_jax.data.cases import natural_key
from livseg_jax.data.folds import contiguous_folds, shuffled_cases

SPLIT_FILE = "split.json"
SETTINGS = ("test_cases", "val_fraction", "folds", "fold", "seed")


def make_split(case_ids: Sequence[str], test_cases: int, val_fraction: float = 0.25, folds: int = 0,
               fold: int = 0, seed: int = 0) -> dict[str, Any]:
    """Returns {"settings", "cases", "train", "val", "test"} (ids; each list sorted) for these cases."""
    order = shuffled_cases(case_ids, seed)
    ids = sorted(order, key=natural_key)
    test_cases, folds, fold = int(test_cases), int(folds), int(fold)
    if not 0 < test_cases < len(ids) - 1:
        raise ValueError(f"split.test_cases = {test_cases} with {len(ids)} cases: need >= 1 test case and "
                         ">= 2 cases for training and validation")
    test, rest = order[:test_cases], order[test_cases:]
    if folds:
        if not 2 <= folds <= len(rest) or not 0 <= fold < folds:
            raise ValueError(f"split.folds = {folds}, split.fold = {fold}: need 2 <= folds <= {len(rest)} "
                             "(train + validation cases) and 0 <= fold < folds")
        val = contiguous_folds(rest, folds)[fold]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"split.val_fraction must be in (0, 1), got {val_fraction}")
        n_val = min(max(1, round(val_fraction * len(rest))), len(rest) - 1)
        val = rest[len(rest) - n_val:]
    train = [c for c in rest if c not in set(val)]
    settings = {"test_cases": test_cases, "val_fraction": float(val_fraction), "folds": folds, "fold": fold,
                "seed": int(seed)}
    return {"settings": settings, "cases": ids, "train": sorted(train, key=natural_key),
            "val": sorted(val, key=natural_key), "test": sorted(test, key=natural_key)}


def load_or_create(study_dir: str | os.PathLike, case_ids: Sequence[str],
                   settings: Mapping[str, Any]) -> dict[str, Any]:
    """Returns the study's split: `split.json` when it matches, else a new one saved there.

    Raises ValueError when `split.json` was made from other cases or settings: a study's runs must
    all be trained and tested on one split.
    """
    split = make_split(case_ids, **{k: settings[k] for k in SETTINGS})
    path = pathlib.Path(study_dir) / SPLIT_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable split file ({e})") from e
        differ = [k for k in ("settings", "cases", "train", "val", "test") if saved.get(k) != split[k]]
        if differ:
            raise ValueError(f"{path}: this study directory's split was made from other cases or split settings "
                             f"({', '.join(differ)} differ; saved settings {saved.get('settings')}, now "
                             f"{split['settings']}); rerun with the original data and split settings, or use a "
                             "new --workdir")
        return saved
    atomic_write.write_json(path, split)
    return split

