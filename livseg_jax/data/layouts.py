"""Finding the cases of a dataset: LiTS, Medical Segmentation Decathlon, or an explicit list file.

- LiTS: `volume-N.nii[.gz]` with `segmentation-N.nii[.gz]` anywhere below the root (the official
  release splits them over "Training Batch 1/2" folders); a volume without a segmentation is a case
  without a label.
- MSD: `dataset.json` with a `training` list of `{"image": ..., "label": ...}` paths relative to the
  root (`imagesTr/`, `labelsTr/`); without `dataset.json`, files of `imagesTr/` are paired with
  `labelsTr/` by name. macOS `._*` resource files are skipped.
- nnU-Net v2 raw (`DatasetXXX_Name/`): `dataset.json` with `channel_names`, `labels` and
  `file_ending`; images `imagesTr/<case>_0000<file_ending>`, labels `labelsTr/<case><file_ending>`.
  One CT channel only (`_0000`; a `_0001` file is refused). Label values are remapped to
  0 background / 1 liver / 2 tumour (`nnunet_label_map`), e.g. `{"background": 0, "liver": 1,
  "tumour": 2}` as it stands, or liver 2 / tumour 1 swapped. MSD `dataset.json` files
  (`{"0": "background", "1": "liver", "2": "cancer"}`) get the same remapping.
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

LAYOUTS = ("auto", "lits", "msd", "nnunet", "list")
NNUNET_CHANNEL = "_0000"  # nnU-Net's first (for CT: only) input channel
CLASSES = {"background": 0, "liver": 1, "tumour": 2, "tumor": 2}
# dataset.json label names taken as liver / tumour without a data.label_map (lower case, "_" for
# spaces and hyphens); any other name needs data.label_map.
LABEL_NAMES = {
    "background": 0,
    "liver": 1,
    **{n: 2 for n in ("tumour", "tumor", "tumours", "tumors", "liver_tumour", "liver_tumor", "liver_tumours",
                      "liver_tumors", "lesion", "lesions", "liver_lesion", "liver_lesions", "cancer",
                      "liver_cancer")},
}
_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_SEGMENTATION = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class CaseFiles:
    """One case on disk: an id, the image path and the label path (None when unlabelled)."""

    case_id: str
    image: pathlib.Path
    label: pathlib.Path | None = None
    # (value in the label file, 0/1/2) pairs when the dataset's labels need remapping, else None
    label_map: tuple[tuple[int, int], ...] | None = None


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


def discover_msd(root: PathLike, label_map: str = "", dataset: dict | None = None) -> list[CaseFiles]:
    """Returns the training cases of a Medical Segmentation Decathlon folder.

    `dataset`: its dataset.json already parsed (by `discover`'s layout detection), else read here."""
    root = pathlib.Path(root)
    meta = root / "dataset.json"
    cases = []
    if meta.exists():
        dataset = read_dataset_json(meta) if dataset is None else dataset
        try:
            entries = [(e["image"], e.get("label")) for e in dataset["training"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{meta}: cannot read the 'training' list of a dataset.json: {e!r}") from e
        values = nnunet_label_map(dataset["labels"], label_map, meta) if "labels" in dataset else None
        for image_rel, label_rel in entries:
            image = _resolve(root, image_rel, meta)
            label = _resolve(root, label_rel, meta) if label_rel else None
            cases.append(CaseFiles(case_id_of(image), image, label, values if label else None))
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


def read_dataset_json(meta: pathlib.Path) -> dict:
    """Returns the parsed dataset.json, raising DataError naming it when unreadable."""
    try:
        dataset = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{meta}: cannot read dataset.json: {e}") from e
    if not isinstance(dataset, dict):
        raise DataError(f"{meta}: dataset.json must hold a JSON object")
    return dataset


def _declared_labels(labels: object, where: PathLike) -> dict[str, int]:
    """Returns {label name: file value} of a dataset.json `labels` (nnU-Net v2 or MSD style)."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(f"{where}: 'labels' must be a non-empty object of label names and values")
    declared: dict[str, int] = {}
    for key, value in labels.items():
        if isinstance(value, str) and str(key).isdigit():  # MSD: {"1": "liver"}
            name, number = value, int(key)
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            name, number = str(key), value
        else:
            raise DataError(f"{where}: label {key!r}: {value!r} is neither 'name': value nor 'value': "
                            "'name' (region-based labels, lists of values, are not supported)")
        name = re.sub(r"[\s-]+", "_", name.strip().lower())
        if name in declared:
            raise DataError(f"{where}: label name {name!r} appears twice")
        declared[name] = number
    if len(set(declared.values())) != len(declared):
        raise DataError(f"{where}: two labels share one value: {declared}")
    return declared


def _parse_label_map(spec: str, declared: dict[str, int], where: PathLike) -> dict[int, int]:
    """Returns {file value: class} from a data.label_map string `source=target,...`."""
    by_value = {v: v for v in declared.values()}
    chosen: dict[int, int] = {}
    for item in (part.strip() for part in spec.split(",")):
        source, sep, target = (t.strip().lower() for t in item.partition("="))
        if not sep or not source or not target:
            raise ValueError(f"data.label_map: {item!r} is not 'label=class' (e.g. 'liver=liver,tumour=tumour')")
        source = re.sub(r"[\s-]+", "_", source)
        value = declared.get(source, by_value.get(int(source)) if source.isdigit() else None)
        if value is None:
            raise ValueError(f"data.label_map: {source!r} is not a label of {where}: {declared}")
        if target not in CLASSES and target not in ("0", "1", "2"):
            raise ValueError(f"data.label_map: class {target!r} must be background, liver, tumour or 0, 1, 2")
        if value in chosen:
            raise ValueError(f"data.label_map: label {source!r} is mapped twice")
        chosen[value] = CLASSES[target] if target in CLASSES else int(target)
    return chosen


def nnunet_label_map(labels: object, spec: str, where: PathLike) -> tuple[tuple[int, int], ...] | None:
    """Returns the (file value, 0/1/2 class) pairs of a dataset.json's labels, None when unchanged.

    Without `spec` (data.label_map), labels are known by name (`LABEL_NAMES`); otherwise `spec`
    says, as `label=class` pairs (label: a dataset.json name or value; class: background, liver,
    tumour or 0, 1, 2), what every label other than background becomes. Unknown names,
    unmapped labels, a label mapped twice and two labels found as "liver" are refused.
    """
    declared = _declared_labels(labels, where)
    if spec.strip():
        chosen = _parse_label_map(spec, declared, where)
        if declared.get("background", 0) not in chosen:
            chosen[declared.get("background", 0)] = 0
        missing = sorted(n for n, v in declared.items() if v not in chosen)
        if missing:
            raise ValueError(f"data.label_map: says nothing about label(s) {missing} of {where}; "
                             "map each to background, liver or tumour")
    else:
        unknown = sorted(n for n in declared if n not in LABEL_NAMES)
        if unknown:
            raise DataError(f"{where}: label(s) {unknown} are not known as background, liver or tumour; "
                            "set data.label_map, e.g. 'liver=liver,tumour=tumour,"
                            f"{unknown[0]}=background'")
        chosen = {v: LABEL_NAMES[n] for n, v in declared.items()}
        for cls, what in ((1, "liver"), (2, "tumour")):
            found = sorted(n for n, v in declared.items() if chosen[v] == cls)
            if len(found) > 1:
                raise DataError(f"{where}: labels {found} could all be {what}: ambiguous; set data.label_map")
    if 1 not in chosen.values():
        raise DataError(f"{where}: no label maps to liver ({declared}); set data.label_map")
    pairs = tuple(sorted(chosen.items()))
    return None if all(a == b for a, b in pairs) else pairs


def _parsed_dataset_json(root: pathlib.Path) -> dict | None:
    """Returns root/dataset.json parsed, None when absent or unreadable (discovery reports that)."""
    meta = root / "dataset.json"
    if not meta.exists():
        return None
    try:
        dataset = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    return dataset if isinstance(dataset, dict) else None


def detect_nnunet(root: pathlib.Path, dataset: dict | None = None) -> bool:
    """Returns whether `root` looks like an nnU-Net v2 raw dataset (dataset.json with file_ending).

    `dataset`: root/dataset.json already parsed (None: read here when it exists)."""
    meta = root / "dataset.json"
    if meta.exists():
        dataset = _parsed_dataset_json(root) if dataset is None else dataset
        return isinstance(dataset, dict) and "file_ending" in dataset and "training" not in dataset
    images = root / "imagesTr"
    return images.is_dir() and any(case_id_of(p).endswith(NNUNET_CHANNEL) for p in images.iterdir()
                                   if is_nifti_file(p))


def nnunet_images(folder: pathlib.Path, file_ending: str) -> dict[str, pathlib.Path]:
    """Returns {case id: image} of an nnU-Net images folder, refusing channels other than _0000."""
    images: dict[str, pathlib.Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.endswith(file_ending) or not p.is_file():
            continue
        stem = p.name[: -len(file_ending)]
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        if match is None:
            raise DataError(f"{p}: not an nnU-Net image name <case>_0000{file_ending}")
        if match.group(2) != NNUNET_CHANNEL[1:]:
            raise DataError(f"{p}: input channel {match.group(2)}: only one CT channel (_0000) is supported")
        images[match.group(1)] = p
    return images


def discover_nnunet(root: PathLike, label_map: str = "", dataset: dict | None = None) -> list[CaseFiles]:
    """Returns the training cases of an nnU-Net v2 raw dataset folder (imagesTr/, labelsTr/).

    `dataset`: its dataset.json already parsed (by `discover`'s layout detection), else read here."""
    root = pathlib.Path(root)
    meta = root / "dataset.json"
    if not meta.exists():
        raise DataError(f"{root}: no dataset.json (nnU-Net v2 raw layout)")
    dataset = read_dataset_json(meta) if dataset is None else dataset
    for key in ("labels", "file_ending"):
        if key not in dataset:
            raise DataError(f"{meta}: no {key!r} (nnU-Net v2 dataset.json)")
    channels = dataset.get("channel_names", {"0": "CT"})
    if not isinstance(channels, dict) or len(channels) != 1:
        raise DataError(f"{meta}: channel_names {channels!r}: only one (CT) channel is supported")
    ending = str(dataset["file_ending"])
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{meta}: file_ending {ending!r}: only .nii and .nii.gz are supported")
    values = nnunet_label_map(dataset["labels"], label_map, meta)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no imagesTr/ folder (nnU-Net v2 raw layout)")
    images = nnunet_images(images_dir, ending)
    if not images:
        raise DataError(f"{images_dir}: no <case>_0000{ending} images")
    cases = []
    for case_id, image in images.items():
        label = labels_dir / f"{case_id}{ending}"
        cases.append(CaseFiles(case_id, image, label, values) if label.exists() else CaseFiles(case_id, image))
    return _sorted_unique(cases, root)


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
    """Returns "nnunet", "msd" or "lits" for a dataset folder, raising DataError when none fits."""
    return _detect_layout(pathlib.Path(root))[0]


def _detect_layout(root: pathlib.Path) -> tuple[str, dict | None]:
    """Returns (layout, the dataset.json it parsed or None): discovery takes it on instead of
    reading the file again."""
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    dataset = _parsed_dataset_json(root)
    if detect_nnunet(root, dataset):
        return "nnunet", dataset
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return "msd", dataset
    if any(_LITS_VOLUME.match(p.name) for p in root.rglob("volume-*")):
        return "lits", None
    raise DataError(
        f"{root}: cannot tell the dataset layout: no dataset.json or imagesTr/ (MSD, nnU-Net) and no "
        "volume-N.nii[.gz] (LiTS); pass a list file for other layouts"
    )


def discover(root: PathLike, layout: str = "auto", list_file: PathLike = "",
             label_map: str = "") -> list[CaseFiles]:
    """Returns the dataset's cases sorted by id, for layout "auto", "lits", "msd", "nnunet" or "list".

    `label_map` (config data.label_map) remaps the labels of an nnU-Net or MSD dataset.json.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if label_map and (layout in ("lits", "list") or (layout == "auto" and list_file)):
        raise ValueError(f"data.label_map is for nnU-Net and MSD datasets (dataset.json), not layout "
                         f"{'list' if list_file else layout!r}")
    if layout == "list" or (layout == "auto" and list_file):
        if not list_file:
            raise ValueError('layout "list" needs a list_file')
        path = pathlib.Path(list_file)
        if not path.is_absolute() and not path.exists() and root:
            path = pathlib.Path(root) / path
        if not path.exists():
            raise DataError(f"{path}: list file does not exist")
        return discover_list(path)
    dataset = None  # dataset.json as layout detection parsed it: read once
    if layout == "auto":
        layout, dataset = _detect_layout(pathlib.Path(root))
    elif not pathlib.Path(root).is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    if label_map and layout not in ("msd", "nnunet"):
        raise ValueError(f"data.label_map is for nnU-Net and MSD datasets (dataset.json), not layout {layout!r}")
    if layout == "nnunet":
        return discover_nnunet(root, label_map, dataset)
    return discover_lits(root) if layout == "lits" else discover_msd(root, label_map, dataset)


# ------------------------------------------------- the inputs of predict, evaluate and visualize


def nifti_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """Returns the visible .nii/.nii.gz files directly in `folder`, in natural order."""
    return sorted((p for p in folder.iterdir() if is_nifti_file(p)), key=lambda p: natural_key(p.name))


def find_inputs(path: PathLike) -> list[CaseFiles]:
    """Returns the CT images to predict: one file, a LiTS folder's volumes, an nnU-Net dataset's
    imagesTs/ (case ids without `_0000`), or a folder's NIfTI files."""
    path = pathlib.Path(path)
    if path.is_file():
        if not path.name.endswith(NIFTI_ENDINGS):
            raise DataError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
        return [CaseFiles(case_id_of(path), path)]
    if not path.is_dir():
        raise DataError(f"{path}: input does not exist")
    if detect_nnunet(path):  # an nnU-Net dataset: its test images
        if not (path / "imagesTs").is_dir():
            raise DataError(f"{path}: nnU-Net dataset without imagesTs/; give the folder of images to predict")
        path = path / "imagesTs"
    elif any(path.rglob("volume-*.nii*")):
        return discover_lits(path)
    files = nifti_files(path)
    if not files:
        raise DataError(f"{path}: no .nii or .nii.gz images in this folder")
    stems = [re.fullmatch(r"(.+)_(\d{4})", case_id_of(p)) for p in files]
    cases = {m.group(1) for m in stems if m and m.group(2) == NNUNET_CHANNEL[1:]}
    if cases and all(m and m.group(1) in cases for m in stems):  # nnU-Net images: <case>_0000.nii.gz
        other = [p for p, m in zip(files, stems, strict=True) if m.group(2) != NNUNET_CHANNEL[1:]]
        if other:
            raise DataError(f"{other[0]}: input channel other than _0000: only one CT channel is supported")
        return _sorted_unique([CaseFiles(m.group(1), p) for p, m in zip(files, stems, strict=True)], path)
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
        cases = discover(path, layout)
        remapped = [c for c in cases if c.label_map is not None]
        if remapped:  # read as they are, their values would be taken for other classes
            raise DataError(f"{path}: the labels of this dataset need remapping {remapped[0].label_map} "
                            "(dataset.json); give ground truth as 0/1/2 label files instead")
        labelled = [c.label for c in cases if c.label is not None]
        if not labelled:
            raise DataError(f"{path}: {layout} layout with no label files")
        return _keyed(labelled, path)
    return _keyed(_label_maps_in(path), path)
