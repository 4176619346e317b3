"""Finding the cases of a dataset: LiTS, Medical Segmentation Decathlon, or an explicit list file.

- LiTS: `volume-N.nii[.gz]` with `segmentation-N.nii[.gz]` anywhere below the root (the official
  release splits them over "Training Batch 1/2" folders); a volume without a segmentation is a case
  without a label.
- MSD: `dataset.json` with a `training` list of `{"image": ..., "label": ...}` paths relative to the
  root (`imagesTr/`, `labelsTr/`); without `dataset.json`, files of `imagesTr/` are paired with
  `labelsTr/` by name. macOS `._*` resource files are skipped.
- List: a text file with one case per line, `image_path [label_path]`, paths relative to the list
  file's folder; blank lines and `#` comments are ignored; quote paths with spaces.

Cases come back sorted by case id in natural order (`volume-2` before `volume-10`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex

from livseg_jax.data.nifti import DataError, PathLike, case_id_of

LAYOUTS = ("auto", "lits", "msd", "list")
_NIFTI_ENDINGS = (".nii", ".nii.gz")
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """One case on disk: an id, the image path and the label path (None when unlabelled)."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path | None = None


def natural_key(text: str) -> tuple:
    """Returns a sort key that orders embedded numbers numerically (`a2` before `a10`)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _is_nifti(path: pathlib.Path) -> bool:
    return path.is_file() and path.name.endswith(_NIFTI_ENDINGS) and not path.name.startswith(".")


def _by_number(files: list[pathlib.Path], pattern: re.Pattern, root: pathlib.Path) -> dict[int, pathlib.Path]:
    by_number: dict[int, pathlib.Path] = {}
    for p in files:
        match = pattern.match(p.name)
        if not match:
            continue
        n = int(match.group(1))
        if n in by_number:
            raise DataError(f"{root}: case {n} appears twice: {by_number[n]} and {p}")
        by_number[n] = p
    return by_number


def discover_lits(root: PathLike) -> list[CaseFiles]:
    """Returns the cases of a LiTS-layout folder (searched recursively)."""
    root = pathlib.Path(root)
    files = [p for p in sorted(root.rglob("*.nii*")) if _is_nifti(p)]
    volumes = _by_number(files, _LITS_VOLUME, root)
    segs = _by_number(files, _LITS_SEGMENTATION, root)
    if not volumes:
        raise DataError(f"{root}: no LiTS volumes (volume-N.nii or volume-N.nii.gz) found")
    orphans = sorted(set(segs) - set(volumes))
    if orphans:
        raise DataError(f"{segs[orphans[0]]}: segmentation without a matching volume-{orphans[0]}")
    return [CaseFiles(f"volume-{n}", volumes[n], segs.get(n)) for n in sorted(volumes)]


def _resolve(base: pathlib.Path, rel: str, where: PathLike) -> pathlib.Path:
    path = pathlib.Path(rel)
    path = path if path.is_absolute() else (base / path)
    if not path.exists():
        raise DataError(f"{where}: listed file {path} does not exist")
    return path


def discover_msd(root: PathLike) -> list[CaseFiles]:
    """Returns the training cases of a Medical Segmentation Decathlon folder."""
    root = pathlib.Path(root)
    meta = root / "dataset.json"
    cases = []
    if meta.exists():
        try:
            training = json.loads(meta.read_text())["training"]
            entries = [(e["image"], e.get("label")) for e in training]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{meta}: cannot read the 'training' list of a dataset.json: {e}") from e
        for image_rel, label_rel in entries:
            image = _resolve(root, image_rel, meta)
            label = _resolve(root, label_rel, meta) if label_rel else None
            cases.append(CaseFiles(case_id_of(image), image, label))
    else:
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        if not images_dir.is_dir():
            raise DataError(f"{root}: no dataset.json and no imagesTr/ folder (MSD layout)")
        for image in sorted(p for p in images_dir.iterdir() if _is_nifti(p)):
            label = labels_dir / image.name
            cases.append(CaseFiles(case_id_of(image), image, label if label.exists() else None))
        if not cases:
            raise DataError(f"{images_dir}: no .nii or .nii.gz images")
    return _sorted_unique(cases, meta if meta.exists() else root)


def discover_list(list_file: PathLike) -> list[CaseFiles]:
    """Returns the cases named in a list file (`image_path [label_path]` per line)."""
    list_file = pathlib.Path(list_file)
    try:
        lines = list_file.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{list_file}: cannot read list file: {e}") from e
    base = list_file.parent
    cases = []
    for number, line in enumerate(lines, start=1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as e:
            raise DataError(f"{list_file}:{number}: cannot parse line: {e}") from e
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(f"{list_file}:{number}: expected 'image [label]', got {len(fields)} fields")
        where = f"{list_file}:{number}"
        image = _resolve(base, fields[0], where)
        label = _resolve(base, fields[1], where) if len(fields) == 2 else None
        cases.append(CaseFiles(case_id_of(image), image, label))
    if not cases:
        raise DataError(f"{list_file}: list file names no cases")
    return _sorted_unique(cases, list_file)


def _sorted_unique(cases: list[CaseFiles], where: PathLike) -> list[CaseFiles]:
    cases = sorted(cases, key=lambda c: natural_key(c.case_id))
    for a, b in zip(cases, cases[1:], strict=False):
        if a.case_id == b.case_id:
            raise DataError(f"{where}: two cases share the id {a.case_id!r}: {a.image} and {b.image}")
    return cases


def detect_layout(root: PathLike) -> str:
    """Returns "msd" or "lits" for a dataset folder, raising DataError when neither fits."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return "msd"
    if any(_LITS_VOLUME.match(p.name) for p in root.rglob("volume-*")):
        return "lits"
    raise DataError(
        f"{root}: cannot tell the dataset layout: no dataset.json or imagesTr/ (MSD) and no "
        "volume-N.nii[.gz] (LiTS); pass a list file for other layouts"
    )


def discover(root: PathLike, layout: str = "auto", list_file: PathLike = "") -> list[CaseFiles]:
    """Returns the dataset's cases sorted by id, for layout "auto", "lits", "msd" or "list"."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "list" or (layout == "auto" and list_file):
        if not list_file:
            raise ValueError('layout "list" needs a list_file')
        path = pathlib.Path(list_file)
        if not path.is_absolute() and not path.exists() and root:
            path = pathlib.Path(root) / path
        if not path.exists():
            raise DataError(f"{path}: list file does not exist")
        return discover_list(path)
    if layout == "auto":
        layout = detect_layout(root)
    elif not pathlib.Path(root).is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    return discover_lits(root) if layout == "lits" else discover_msd(root)
