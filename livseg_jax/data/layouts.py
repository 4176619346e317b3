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

The command-line tools find their files here too: `find_inputs` (CT images to predict: one file, a
LiTS folder's volumes, or a folder's NIfTI files), `plan_outputs` (their label-map paths),
`prediction_files` / `truth_files` (label maps keyed by `cases.case_key`, for pairing).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import shlex
from collections.abc import Sequence

from livseg_jax.data.cases import NIFTI_ENDINGS, case_id_of, case_key, is_nifti_file, natural_key, output_name
from livseg_jax.data.nifti import DataError, PathLike

LAYOUTS = ("auto", "lits", "msd", "list")
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """One case on disk: an id, the image path and the label path (None when unlabelled)."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path | None = None


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
    files = [p for p in sorted(root.rglob("*.nii*")) if is_nifti_file(p)]
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
        for image in sorted(p for p in images_dir.iterdir() if is_nifti_file(p)):
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


# ------------------------------------------------- the inputs of predict, evaluate and visualize


def nifti_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Returns the visible .nii/.nii.gz files directly in `folder`, in natural order."""
    return sorted((p for p in folder.iterdir() if is_nifti_file(p)), key=lambda p: natural_key(p.name))


def find_inputs(path: PathLike) -> list[CaseFiles]:
    """Returns the CT images to predict: one file, a LiTS folder's volumes, or a folder's NIfTI files."""
    path = pathlib.Path(path)
    if path.is_file():
        if not path.name.endswith(NIFTI_ENDINGS):
            raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
        return [CaseFiles(case_id_of(path), path)]
    if not path.is_dir():
        raise DataError(f"{path}: input does not exist")
    if any(path.rglob("volume-*.nii*")):
        return discover_lits(path)
    files = nifti_files(path)
    if not files:
        raise DataError(f"{path}: no .nii or .nii.gz images in this folder")
    return [CaseFiles(case_id_of(p), p) for p in files]


def plan_outputs(cases: Sequence[CaseFiles],
                 output: PathLike) -> list[tuple[CaseFiles, pathlib.Path]]:
    """Returns (case, label-map path) pairs, refusing outputs that would overwrite an input."""
    output = pathlib.Path(output)
    if output.name.endswith(NIFTI_ENDINGS):
        if len(cases) != 1:
            raise ValueError(f"{output}: a file name as output needs exactly one input, got {len(cases)}")
        jobs = [(cases[0], output)]
    else:
        if output.exists() and not output.is_dir():
            raise ValueError(f"{output}: output exists and is not a folder")
        jobs = [(c, output / output_name(c.case_id)) for c in cases]
    protected = {p.resolve() for c in cases for p in (c.image, c.label) if p is not None}
    for case, out in jobs:
        if out.resolve() in protected:
            raise ValueError(f"{out}: output would overwrite an input file (case {case.case_id}); "
                             "choose another output folder")
    return jobs


def _keyed(files: Sequence[pathlib.Path], where: PathLike) -> dict[str, pathlib.Path]:
    out: dict[str, pathlib.Path] = {}
    for f in files:
        key = case_key(f)
        if key in out:
            raise DataError(f"{where}: two files belong to case {key!r}: {out[key]} and {f}")
        out[key] = f
    return dict(sorted(out.items(), key=lambda kv: natural_key(kv[0])))


def _label_maps_in(folder: pathlib.Path) -> list[pathlib.Path]:
    files = nifti_files(folder)
    if not files:
        raise DataError(f"{folder}: no .nii or .nii.gz label maps in this folder")
    return files


def _single_file(path: pathlib.Path, what: str) -> dict[str, pathlib.Path] | None:
    """Returns {case id: path} when `path` is a file, None for a folder; raises DataError if neither."""
    if path.is_file():
        return {case_key(path): path}
    if not path.is_dir():
        raise DataError(f"{path}: {what} file or folder does not exist")
    return None


def prediction_files(path: PathLike) -> dict[str, pathlib.Path]:
    """Returns {case id: label map} for one prediction file or the NIfTI files of a folder."""
    path = pathlib.Path(path)
    single = _single_file(path, "prediction")
    return single if single is not None else _keyed(_label_maps_in(path), path)


def truth_files(path: PathLike) -> dict[str, pathlib.Path]:
    """Returns {case id: label map} of a ground-truth file, LiTS/MSD folder or folder of label files."""
    path = pathlib.Path(path)
    single = _single_file(path, "ground-truth")
    if single is not None:
        return single
    try:
        layout = detect_layout(path)
    except DataError:
        layout = None
    if layout is not None:
        labelled = [c.label for c in discover(path, layout) if c.label is not None]
        if not labelled:
            raise DataError(f"{path}: {layout} layout with no label files")
        return _keyed(labelled, path)
    return _keyed(_label_maps_in(path), path)
