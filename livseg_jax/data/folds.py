"""Case-level splits for training: k-fold cross-validation folds, and the run directory's `splits.json`.

One rule makes every k-fold split in the package (`livseg_jax.train` with `data.num_folds`, and the
study's `split.folds`): the case ids are sorted naturally, shuffled with
`numpy.random.default_rng(seed)`, and cut into K near-equal contiguous folds (`shuffled_cases`,
then `contiguous_folds`; sizes differ by at most one). Fold k validates; the other folds train.

A training run saves its split as `splits.json` in the run directory (`load_or_save_split`) and a
resumed run must find the same one there: another case list, fold or seed is refused, so the
checkpoints and the split they were trained on cannot drift apart. Without folds (`num_folds` 0)
the file records the hold-out split: the last `data.num_val_cases` cases validate. A split given by
case id (`data.train_cases` / `data.val_cases`, how a study hands its runs their cases) is
`given_split`, saved and checked the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from livseg_jax import atomic_write
from livseg_jax.data.cases import natural_key

SPLITS_FILE = "splits.json"


def shuffled_cases(case_ids: Sequence[str], seed: int) -> list[str]:
    """Returns the case ids sorted naturally, then permuted by `numpy.random.default_rng(seed)`."""
    ids = sorted(set(case_ids), key=natural_key)
    if len(ids) != len(case_ids):
        raise ValueError("split: case ids repeat")
    return [ids[i] for i in np.random.default_rng(int(seed)).permutation(len(ids))]


def contiguous_folds(ordered: Sequence[str], num_folds: int) -> list[list[str]]:
    """Returns `ordered` cut into `num_folds` near-equal contiguous folds, each sorted naturally."""
    num_folds = int(num_folds)
    if not 2 <= num_folds <= len(ordered):
        raise ValueError(f"num_folds = {num_folds} with {len(ordered)} cases: need 2 <= num_folds <= the "
                         "number of cases")
    return [sorted(part.tolist(), key=natural_key)
            for part in np.array_split(np.array(list(ordered), dtype=object), num_folds)]


def kfold(case_ids: Sequence[str], num_folds: int, seed: int) -> list[list[str]]:
    """Returns the k-fold partition of `case_ids`: `num_folds` disjoint sorted folds covering every case once."""
    return contiguous_folds(shuffled_cases(case_ids, seed), num_folds)


def make_training_split(case_ids: Sequence[str], num_folds: int, fold: int, seed: int,
                        num_val_cases: int) -> dict[str, Any]:
    """Returns a run's split {"num_folds", "fold", "seed", "cases", "folds", "train", "val"} (ids).

    `num_folds` >= 2: fold `fold` of `kfold(case_ids, num_folds, seed)` validates, the rest trains.
    `num_folds` 0: the last `num_val_cases` cases of the given order validate ("folds" and "seed"
    are None: the hold-out split does not depend on them).
    """
    ids = list(case_ids)
    num_folds, fold = int(num_folds), int(fold)
    if num_folds:
        if not 0 <= fold < num_folds:
            raise ValueError(f"data.fold = {fold}: need 0 <= fold < data.num_folds = {num_folds}")
        try:
            folds = kfold(ids, num_folds, seed)
        except ValueError as e:
            raise ValueError(f"data.num_folds: {e}") from None
        val = folds[fold]
        held_out = set(val)
        train = [c for c in ids if c not in held_out]
        return {"num_folds": num_folds, "fold": fold, "seed": int(seed), "cases": sorted(ids, key=natural_key),
                "folds": folds, "train": sorted(train, key=natural_key), "val": val}
    n_val = int(num_val_cases)
    if len(ids) <= n_val:
        raise ValueError(f"{len(ids)} cases found but data.num_val_cases = {n_val}: nothing left to train on")
    return {"num_folds": 0, "fold": 0, "seed": None, "cases": sorted(ids, key=natural_key), "folds": None,
            "train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val:]}


def given_split(case_ids: Sequence[str], train: Sequence[str], val: Sequence[str],
                num_folds: int = 0) -> dict[str, Any]:
    """Returns a run's split (as `make_training_split`) training on `train` and validating on `val`,
    the case ids of `data.train_cases` / `data.val_cases` (a study's split), checked against the
    dataset's `case_ids`; ValueError names the setting."""
    train, val = [str(c) for c in train], [str(c) for c in val]
    if int(num_folds):
        raise ValueError(f"data.train_cases / data.val_cases name the split: leave data.num_folds 0, got {num_folds}")
    if not train:
        raise ValueError("data.val_cases given without data.train_cases: nothing to train on")
    known = set(case_ids)
    for key, ids in (("data.train_cases", train), ("data.val_cases", val)):
        unknown = [c for c in ids if c not in known]
        if unknown:
            raise ValueError(f"{key}: case(s) {', '.join(unknown[:5])} are not in the dataset ({len(known)} cases)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{key}: case ids repeat")
    both = sorted(set(train) & set(val), key=natural_key)
    if both:
        raise ValueError(f"data.train_cases and data.val_cases share case(s) {', '.join(both[:5])}")
    return {"num_folds": 0, "fold": 0, "seed": None, "cases": sorted(train + val, key=natural_key), "folds": None,
            "train": train, "val": val}


def read_split(path: str | os.PathLike) -> dict[str, Any]:
    """Returns a saved `splits.json` (the file, or the run directory holding it); ValueError names it."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / SPLITS_FILE
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no split file (runs trained before splits.json existed: retrain, or "
                         "train with data.num_folds to make fold runs)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable split file ({e})") from e
    missing = [k for k in ("num_folds", "fold", "cases", "train", "val") if k not in split]
    if missing:
        raise ValueError(f"{path}: not a split file (no {', '.join(missing)})")
    return split


def load_or_save_split(workdir: str | os.PathLike, split: Mapping[str, Any], write: bool = True) -> dict[str, Any]:
    """Returns `split` after saving it as `workdir/splits.json`, or checking it against the saved one.

    Raises ValueError when the run directory's `splits.json` holds another split: a run's
    checkpoints belong to the cases it was trained on. `write` False (non-chief processes) only checks.
    """
    path = pathlib.Path(workdir) / SPLITS_FILE
    if path.exists():
        saved = read_split(path)
        differ = [k for k in ("num_folds", "fold", "seed", "cases", "train", "val") if saved.get(k) != split.get(k)]
        if differ:
            raise ValueError(f"{path}: this run directory was trained on another split ({', '.join(differ)} "
                             f"differ: saved num_folds {saved.get('num_folds')}, fold {saved.get('fold')}, seed "
                             f"{saved.get('seed')}; now {split.get('num_folds')}, {split.get('fold')}, "
                             f"{split.get('seed')}); use the original data and fold settings, or a new --workdir")
        return dict(saved)
    if write:
        atomic_write.write_json(path, dict(split))
    return dict(split)
