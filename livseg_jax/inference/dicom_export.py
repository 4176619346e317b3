"""DICOM outputs of a prediction on a DICOM series: DICOM-SEG (highdicom) and RTSTRUCT (rt-utils).

Both reference the input series (its Study, FrameOfReference and every slice's SOPInstanceUID)
and carry two structures, from the LiTS label map (0 background, 1 liver, 2 tumour):

- "Liver" = labels >= 1 (the whole organ, tumours included): category Anatomical Structure
  (SCT 91723000), type Liver (SCT 10200004);
- "Tumour" = labels == 2: category Morphologically Abnormal Structure (SCT 49755003), type
  Neoplasm (SCT 108369006), anatomic region Liver.

The SEG is BINARY (masks exact, one frame per source slice that holds the segment); the RTSTRUCT
holds one closed planar contour per connected region and slice, through the centres of the
region's boundary pixels (rt-utils, no contour approximation). Both are written atomically.

Limits: the input series needs a FrameOfReferenceUID (both formats refer to it); RTSTRUCT needs
square pixels (rt-utils 1.2 scales a row's direction by the row spacing, which is only right for
square pixels); an RTSTRUCT needs a liver in the prediction (an empty structure set is not valid
DICOM; the SEG of an empty prediction is written with empty frames). These raise ValueError
naming the series.

highdicom and rt-utils are optional dependencies: `pip install 'livseg_jax[dicom]'`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from livseg_jax import __version__, atomic_write
from livseg_jax.data.cases import sidecar_path
from livseg_jax.data.dicom import Series
from livseg_jax.data.nifti import PathLike

OUTPUT_TYPES = ("nifti", "dicom_seg", "rtstruct")
DICOM_OUTPUT_TYPES = ("dicom_seg", "rtstruct")
OUTPUT_SUFFIXES = {"dicom_seg": ".dcm", "rtstruct": "_rtstruct.dcm"}  # after the label map's name
_MANUFACTURER = "livseg_jax"
_TUMOUR_LABEL = 2


def parse_output_types(values: Sequence[str]) -> list[str]:
    """Returns the distinct output types of `--output-type` values (comma-separated or repeated)."""
    types: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item not in OUTPUT_TYPES:
                raise ValueError(f"--output-type: unknown type {item!r}; choose from {', '.join(OUTPUT_TYPES)}")
            if item not in types:
                types.append(item)
    return types


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"DICOM outputs need {package}, an optional dependency: "
            f"pip install 'livseg_jax[dicom]' (or pip install {package})"
        ) from e


def require_libraries(types: Sequence[str]) -> None:
    """Raises ImportError naming the `dicom` extra when a library of the requested outputs is missing."""
    for kind, (module, package) in (("dicom_seg", ("highdicom", "highdicom")), ("rtstruct", ("rt_utils", "rt-utils"))):
        if kind in types:
            _require(module, package)


def structure_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Returns {"Liver": labels >= 1, "Tumour": labels == 2} as boolean arrays."""
    return {"Liver": labels >= 1, "Tumour": labels == _TUMOUR_LABEL}


def _check_references(series: Series) -> None:
    first = series.datasets[0] if series.datasets else None
    if first is None or not getattr(first, "FrameOfReferenceUID", ""):
        raise ValueError(
            f"{series.where}: the series has no FrameOfReferenceUID; DICOM-SEG and RTSTRUCT must refer "
            "to one (use --output-type nifti)"
        )


def _check_square_pixels(series: Series) -> None:
    if abs(series.pixel_spacing[0] - series.pixel_spacing[1]) > 1e-6:
        raise ValueError(
            f"{series.where}: RTSTRUCT output needs square pixels (PixelSpacing {series.pixel_spacing.tolist()}): "
            "rt-utils would place non-square contours wrongly; use --output-type dicom_seg"
        )


def check_exportable(series: Series, types: Sequence[str]) -> None:
    """Raises ValueError naming the series when it cannot carry the requested DICOM outputs."""
    if any(t in DICOM_OUTPUT_TYPES for t in types):
        _check_references(series)
    if "rtstruct" in types:
        _check_square_pixels(series)


def segmentation_dataset(labels_slices: np.ndarray, series: Series) -> Any:
    """Returns a highdicom BINARY Segmentation of a (slices, rows, cols) label map on `series`."""
    hd = _require("highdicom", "highdicom")
    from pydicom.sr.codedict import codes

    _check_references(series)
    if labels_slices.shape != series.shape:
        raise ValueError(f"label map shape {labels_slices.shape} does not match the series {series.shape}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name="livseg_jax", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="Liver",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Liver,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="Tumour",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Liver],
        ),
    ]
    masks = np.stack(list(structure_masks(labels_slices).values()), axis=-1).astype(np.uint8)
    return hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name="two-stage liver and tumour 3D U-Net",
        software_versions=__version__,
        device_serial_number="none",
        series_description="livseg_jax liver and tumour",
    )


def rtstruct_dataset(labels_slices: np.ndarray, series: Series) -> Any:
    """Returns an RT Structure Set (rt-utils) with Liver and Tumour contours of a (slices, rows, cols) label map."""
    rt_utils = _require("rt_utils", "rt-utils")
    from rt_utils import ds_helper

    _check_references(series)
    if labels_slices.shape != series.shape:
        raise ValueError(f"label map shape {labels_slices.shape} does not match the series {series.shape}")
    _check_square_pixels(series)
    masks = structure_masks(labels_slices)
    if not masks["Liver"].any():
        raise ValueError(f"{series.where}: the prediction holds no liver, and an RT Structure Set needs at "
                         "least one structure; RTSTRUCT not written (the DICOM-SEG and NIfTI outputs can be empty)")
    structure = rt_utils.RTStruct(series.datasets, ds_helper.create_rtstruct_dataset(series.datasets))
    colours = {"Liver": [220, 120, 60], "Tumour": [60, 200, 60]}
    for name, mask in masks.items():
        if mask.any():  # rt-utils refuses an empty mask; an absent structure is left out
            structure.add_roi(mask=mask.transpose(1, 2, 0), name=name, color=colours[name],
                              approximate_contours=False, roi_generation_algorithm="AUTOMATIC")
    return _complete_rtstruct(structure.ds, series.datasets[0])


def _complete_rtstruct(ds: Any, source: Any) -> Any:
    """Returns rt-utils' structure set with what dciodvfy asks for: DS strings of at most 16
    characters (rt-utils writes full float reprs) and the Type 2 / Frame of Reference attributes."""
    from pydicom.valuerep import DSfloat

    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            contour.ContourData = [DSfloat(round(float(v), 4), auto_format=True) for v in contour.ContourData]
    ds.SeriesDescription = "livseg_jax liver and tumour"
    ds.Manufacturer = _MANUFACTURER
    ds.OperatorsName = ""
    for keyword in ("ReferringPhysicianName", "AccessionNumber"):
        setattr(ds, keyword, getattr(source, keyword, ""))
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID
    ds.PositionReferenceIndicator = getattr(source, "PositionReferenceIndicator", "")
    return ds


def output_paths(label_map_path: PathLike, types: Sequence[str]) -> dict[str, pathlib.Path]:
    """Returns {output type: path} of the DICOM outputs beside a case's label-map path."""
    return {t: sidecar_path(label_map_path, OUTPUT_SUFFIXES[t]) for t in types if t in DICOM_OUTPUT_TYPES}


def write_dicom_outputs(labels_slices: np.ndarray, series: Series,
                        paths: dict[str, pathlib.Path]) -> list[pathlib.Path]:
    """Returns the files written atomically for {"dicom_seg"|"rtstruct": path} from a (slices, rows, cols) label map."""
    builders = {"dicom_seg": segmentation_dataset, "rtstruct": rtstruct_dataset}
    datasets = {kind: builders[kind](labels_slices, series) for kind in paths}  # all built before any is written
    for kind, path in paths.items():
        with atomic_write.atomic_path(path) as tmp:
            datasets[kind].save_as(tmp, enforce_file_format=True)
    return list(paths.values())
