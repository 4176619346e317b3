"""Synthetic abdominal CT phantoms with liver and tumour labels: the built-in default dataset.

A phantom is drawn in world millimetres (RAS: x to the patient's left, y anterior, z superior, origin
at the volume centre) so that any voxel spacing gives the same anatomy, and rendered slab by slab
along z so that LiTS-sized volumes (512 x 512 x 400) need little memory. Anatomy scales with the
field of view (the body fills ~85% of it); tumour sizes are absolute (4-40 mm, about 40% under 10 mm).

Tissues (HU, randomised per case): air -1000, table +150, subcutaneous and visceral fat ~-100,
abdominal-wall and paraspinal muscle ~+45, bowel loops +15..+40 (some with gas), kidneys ~+30,
spleen ~+48, aorta ~+42, vertebrae (cancellous ~+250, cortex ~+600, discs ~+80), ribs ~+500,
liver +55..+70 with a smooth random shape in the right upper abdomen, hypodense tumours 20-40 HU
below the liver (large ones with a darker core), Gaussian noise 8-15 HU.

Everything is deterministic given the seed; noise is seeded per slice, so results do not depend on
how the volume is split into slabs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np

from livseg_jax import atomic_write
from livseg_jax.data.layouts import CaseFiles
from livseg_jax.data.nifti import PathLike, save_nifti

SYNTHETIC_VERSION = 1
_SLAB = 32  # slices rendered at a time (bounds memory for 512 x 512 x 400)


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
    center: tuple[float, float, float]  # mm
    radii: tuple[float, float, float]  # mm
    angle: float  # rotation about z, radians
    hu: float


@dataclasses.dataclass(frozen=True)
class _Phantom:
    body: tuple[float, float, float, float]  # cx, cy, a, b (mm)
    body_wave: tuple[float, float, float]  # amplitude, frequency (rad/mm), phase of a(z), b(z)
    fat_frac: float  # subcutaneous fat thickness / b
    wall_frac: float  # muscle wall thickness / b
    hu_fat: float
    hu_muscle: float
    hu_visceral: float
    table: tuple[float, float] | None  # y_top, thickness (mm)
    blobs: tuple[_Ellipsoid, ...]  # bowel, kidneys, spleen, gas
    spine: tuple[float, float, float, float, float]  # cx, cy, radius, period, phase (mm)
    aorta: tuple[float, float, float, float]  # cx, cy, radius, hu
    ribs: tuple[tuple[float, float], ...]  # (z centre, half thickness) mm
    liver: tuple[float, ...]  # cx, cy, cz, a, b, c, angle, taper, hu
    liver_waves: tuple[tuple[float, ...], ...]  # (amplitude, wu, wv, ww, phase)
    tumours: tuple[_Ellipsoid, ...]
    noise_sigma: float
    noise_seed: int


def _coords(n: int, spacing: float) -> np.ndarray:
    return ((np.arange(n) - (n - 1) / 2) * spacing).astype(np.float32)


def _liver_field(liver: tuple, waves: tuple, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Implicit liver function on broadcast coordinates; the liver is where it is < 1."""
    cx, cy, cz, a, b, c, angle, taper, _ = liver
    cos, sin = np.cos(angle), np.sin(angle)
    xr, yr = x - cx, y - cy
    u = (cos * xr + sin * yr) / a  # -1: patient's right edge, +1: left-lobe tip
    v = (-sin * xr + cos * yr) / b
    w = (z - cz) / c
    shrink = 1.0 - taper * (np.clip(u, -1, 1) + 1) / 2  # the left lobe is thinner
    f = u**2 + (v / shrink) ** 2 + (w / shrink) ** 2
    for amp, wu, wv, ww, phase in waves:
        f = f + amp * np.sin(wu * u + wv * v + ww * w + phase)
    return f


def _draw_params(
    shape_xyz: Sequence[int], spacing_xyz: Sequence[float], rng: np.random.Generator
) -> _Phantom:
    spacing = np.asarray(spacing_xyz, dtype=np.float64)
    fx, fy, fz = np.asarray(shape_xyz) * spacing
    a, b = fx * rng.uniform(0.40, 0.45), fy * rng.uniform(0.30, 0.35)
    cy = fy * rng.uniform(-0.03, 0.03)
    fat_frac, wall_frac = rng.uniform(0.07, 0.13), rng.uniform(0.05, 0.08)
    inner_a, inner_b = a * (1 - fat_frac - wall_frac), b * (1 - fat_frac - wall_frac)
    table_top = cy - b - rng.uniform(4, 12)
    table = (table_top, 8.0) if table_top - 8.0 > -fy / 2 else None

    r_vb = 0.17 * b
    spine = (
        0.0,
        cy - b * (1 - fat_frac - wall_frac) + 1.1 * r_vb,
        r_vb,
        rng.uniform(26, 32),
        rng.uniform(0, 30),
    )
    aorta = (0.4 * r_vb, spine[1] + 1.6 * r_vb, 0.6 * r_vb, rng.uniform(38, 46))

    liver_hu = rng.uniform(55, 70)
    la, lb, lc = (
        inner_a * rng.uniform(0.55, 0.65),
        inner_b * rng.uniform(0.6, 0.75),
        min(rng.uniform(65, 85), 0.33 * fz),
    )
    liver = (
        -inner_a + la * rng.uniform(0.95, 1.1),
        cy + inner_b * rng.uniform(-0.05, 0.15),
        fz * rng.uniform(0.0, 0.12),
        la,
        lb,
        lc,
        rng.uniform(-0.25, 0.25),
        rng.uniform(0.35, 0.6),
        liver_hu,
    )
    waves = tuple(
        (rng.uniform(0.06, 0.18), *rng.uniform(-4.0, 4.0, size=3), rng.uniform(0, 2 * np.pi))
        for _ in range(3)
    )

    blobs = []
    for side in (-1, 1):  # kidneys, lateral to the spine, below the liver's centre
        blobs.append(
            _Ellipsoid(
                (side * (r_vb + 0.3 * inner_a), spine[1] + 0.4 * r_vb, liver[2] - lc * rng.uniform(0.5, 0.8)),
                (0.16 * inner_a, 0.22 * inner_b, min(50.0, 0.25 * fz)),
                side * rng.uniform(0.2, 0.5),
                rng.uniform(26, 34),
            )
        )
    blobs.append(  # spleen, left posterior
        _Ellipsoid(
            (0.62 * inner_a, cy - 0.35 * inner_b, liver[2] + rng.uniform(-10, 10)),
            (0.2 * inner_a, 0.3 * inner_b, min(rng.uniform(40, 55), 0.25 * fz)),
            rng.uniform(-0.6, -0.2),
            rng.uniform(44, 52),
        )
    )
    for _ in range(int(rng.integers(10, 18))):  # bowel loops, some holding gas
        center = (
            rng.uniform(-0.6, 0.8) * inner_a,
            cy + rng.uniform(-0.2, 0.8) * inner_b,
            rng.uniform(-0.5, 0.3) * fz,
        )
        radii = tuple(rng.uniform(0.08, 0.16, size=2) * (inner_a + inner_b) / 2) + (rng.uniform(15, 40),)
        blobs.append(_Ellipsoid(center, radii, rng.uniform(0, np.pi), rng.uniform(15, 40)))
        if rng.random() < 0.3:
            blobs.append(_Ellipsoid(center, tuple(r * 0.5 for r in radii), 0.0, rng.uniform(-950, -700)))

    rib_period = rng.uniform(24, 30)
    rib_z = np.arange(liver[2] - lc * 0.6, fz / 2, rib_period) + rng.uniform(0, rib_period)
    ribs = tuple((float(z), rng.uniform(4, 6)) for z in rib_z)

    tumours = []
    for _ in range(int(rng.integers(0, 6))):
        diameter = (
            rng.uniform(4, 10) if rng.random() < 0.4 else rng.uniform(10, max(10.5, min(40.0, 0.8 * lb)))
        )
        for _attempt in range(50):  # a centre well inside the liver, snapped to a voxel centre
            point = np.array(liver[:3]) + rng.uniform(-1, 1, size=3) * np.array(liver[3:6])
            half = (np.asarray(shape_xyz) - 1) / 2
            point = (np.round(point / spacing + half) - half) * spacing
            if _liver_field(liver, waves, *point) < 0.6:
                break
        else:
            continue
        radii = tuple(diameter / 2 * rng.uniform(0.8, 1.2, size=3))
        tumours.append(_Ellipsoid(tuple(point), radii, rng.uniform(0, np.pi), liver_hu - rng.uniform(20, 40)))

    return _Phantom(
        body=(0.0, cy, a, b),
        body_wave=(rng.uniform(0.02, 0.05), rng.uniform(0.01, 0.03), rng.uniform(0, 2 * np.pi)),
        fat_frac=fat_frac,
        wall_frac=wall_frac,
        hu_fat=rng.uniform(-110, -85),
        hu_muscle=rng.uniform(40, 52),
        hu_visceral=rng.uniform(-100, -80),
        table=table,
        blobs=tuple(blobs),
        spine=spine,
        aorta=aorta,
        ribs=ribs,
        liver=liver,
        liver_waves=waves,
        tumours=tuple(tumours),
        noise_sigma=rng.uniform(8, 15),
        noise_seed=int(rng.integers(2**62)),
    )


def _box(coord: np.ndarray, lo: float, hi: float) -> slice:
    return slice(int(np.searchsorted(coord, lo)), int(np.searchsorted(coord, hi, side="right")))


def _ellipsoid_mask(e: _Ellipsoid, x, y, z) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    reach = max(e.radii[0], e.radii[1])
    box = (
        _box(x, e.center[0] - reach, e.center[0] + reach),
        _box(y, e.center[1] - reach, e.center[1] + reach),
        _box(z, e.center[2] - e.radii[2], e.center[2] + e.radii[2]),
    )
    if any(b.stop <= b.start for b in box):
        return None
    xs, ys, zs = x[box[0], None, None], y[None, box[1], None], z[None, None, box[2]]
    cos, sin = np.cos(e.angle), np.sin(e.angle)
    dx, dy = xs - e.center[0], ys - e.center[1]
    u, v = (cos * dx + sin * dy) / e.radii[0], (-sin * dx + cos * dy) / e.radii[1]
    return box, u**2 + v**2 + ((zs - e.center[2]) / e.radii[2]) ** 2


def _ellipse_xy(x, y, z, cx, cy, a, b) -> np.ndarray:
    return ((x[:, None, None] - cx) / a) ** 2 + ((y[None, :, None] - cy) / b) ** 2 < 1.0


def _render_slab(p: _Phantom, x, y, z, z0: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (HU float32, labels uint8) of the slices at z (mm), slice z[0] being number z0."""
    hu = np.full((x.size, y.size, z.size), -1000.0, np.float32)
    lab = np.zeros(hu.shape, np.uint8)
    cx, cy, a, b = p.body
    amp, freq, phase = p.body_wave
    wave = 1 + amp * np.sin(freq * z + phase)
    az, bz = a * wave[None, None, :], b * wave[None, None, :]
    if p.table is not None:
        hu[np.abs(x) < 0.9 * a, _box(y, p.table[0] - p.table[1], p.table[0])] = 150.0
    body = _ellipse_xy(x, y, z, cx, cy, az, bz)
    hu[body] = p.hu_fat
    wall = 1 - p.fat_frac
    hu[_ellipse_xy(x, y, z, cx, cy, az * wall, bz * wall)] = p.hu_muscle
    inner = 1 - p.fat_frac - p.wall_frac
    cavity = _ellipse_xy(x, y, z, cx, cy, az * inner, bz * inner)
    hu[cavity] = p.hu_visceral

    for e in p.blobs:
        got = _ellipsoid_mask(e, x, y, z)
        if got is not None:
            box, r2 = got
            hu[box][(r2 < 1) & cavity[box]] = e.hu

    scx, scy, r_vb, period, zphase = p.spine
    for side in (-1, 1):  # paraspinal muscles
        muscle = _ellipse_xy(x, y, z, scx + side * 1.6 * r_vb, scy - 1.4 * r_vb, 1.0 * r_vb, 1.1 * r_vb)
        hu[muscle & body] = p.hu_muscle
    disc = np.mod(z + zphase, period) < 5.0
    r2 = ((x[:, None, None] - scx) ** 2 + (y[None, :, None] - scy) ** 2) / r_vb**2
    hu[(r2 < 1) & ~disc] = 600.0
    hu[(r2 < 0.75) & ~disc] = 250.0
    hu[(r2 < 1) & disc] = 80.0
    canal = ((x[:, None, None] - scx) ** 2 + (y[None, :, None] - (scy - 1.45 * r_vb)) ** 2) < (
        0.45 * r_vb
    ) ** 2
    arch = ((x[:, None, None] - scx) ** 2 + (y[None, :, None] - (scy - 1.45 * r_vb)) ** 2) < (0.8 * r_vb) ** 2
    hu[arch & ~disc] = 450.0
    hu[np.broadcast_to(canal, hu.shape)] = 10.0
    acx, acy, ar, ahu = p.aorta
    hu[np.broadcast_to(((x[:, None, None] - acx) ** 2 + (y[None, :, None] - acy) ** 2) < ar**2, hu.shape)] = (
        ahu
    )

    if p.ribs:
        ring = _ellipse_xy(x, y, z, cx, cy, az * (wall - 0.01), bz * (wall - 0.01)) & ~_ellipse_xy(
            x, y, z, cx, cy, az * (inner + 0.01), bz * (inner + 0.01)
        )
        lateral = np.abs(y[None, :, None] - cy) < 0.8 * b  # no ribs at the front and back midline
        for zc, half in p.ribs:
            zs = _box(z, zc - half, zc + half)
            if zs.stop > zs.start:
                hu[:, :, zs][ring[:, :, zs] & lateral] = 500.0

    liver = np.zeros(hu.shape, bool)
    lcx, lcy, lcz, la, lb, lc, *_ = p.liver
    reach = max(la, lb) * 1.6
    box = (
        _box(x, lcx - reach, lcx + reach),
        _box(y, lcy - reach, lcy + reach),
        _box(z, lcz - lc * 1.6, lcz + lc * 1.6),
    )
    if all(s.stop > s.start for s in box):
        f = _liver_field(
            p.liver, p.liver_waves, x[box[0], None, None], y[None, box[1], None], z[None, None, box[2]]
        )
        liver[box] = (f < 1) & cavity[box]
        texture = 3.0 * np.sin(x[box[0], None, None] / 17.0) * np.cos(y[None, box[1], None] / 23.0)
        hu[box] = np.where(liver[box], p.liver[-1] + texture, hu[box])
        lab[liver] = 1
    for t in p.tumours:
        got = _ellipsoid_mask(t, x, y, z)
        if got is None:
            continue
        box, r2 = got
        inside = (r2 < 1) & liver[box]
        hu[box][inside] = t.hu
        if max(t.radii) > 10:  # necrotic core
            hu[box][(r2 < 0.3) & inside] = t.hu - 10
        lab[box][inside] = 2

    for k in range(z.size):
        noise_rng = np.random.default_rng([p.noise_seed, z0 + k])
        hu[:, :, k] += noise_rng.standard_normal(hu.shape[:2], dtype=np.float32) * np.float32(p.noise_sigma)
    return hu, lab


def make_phantom(
    shape_xyz: Sequence[int] = (160, 160, 64),
    spacing_xyz: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int | Sequence[int] = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (HU int16 (X, Y, Z), labels uint8 (X, Y, Z)) of one phantom, axes in RAS order."""
    shape_xyz = tuple(int(s) for s in shape_xyz)
    if len(shape_xyz) != 3 or min(shape_xyz) < 1:
        raise ValueError(f"shape_xyz must be 3 positive sizes, got {shape_xyz}")
    params = _draw_params(shape_xyz, spacing_xyz, np.random.default_rng(seed))
    x, y, z = (_coords(n, s) for n, s in zip(shape_xyz, spacing_xyz, strict=True))
    hu = np.empty(shape_xyz, np.int16)
    lab = np.empty(shape_xyz, np.uint8)
    for z0 in range(0, shape_xyz[2], _SLAB):
        zs = slice(z0, min(z0 + _SLAB, shape_xyz[2]))
        slab_hu, slab_lab = _render_slab(params, x, y, z[zs], z0)
        hu[:, :, zs] = np.clip(np.round(slab_hu), -1024, 3071)
        lab[:, :, zs] = slab_lab
    return hu, lab


def phantom_affine(shape_xyz: Sequence[int], spacing_xyz: Sequence[float]) -> np.ndarray:
    """Returns the (4, 4) affine the phantoms are written with: LPS-like storage (x, y flipped).

    Like NIfTI files converted from DICOM, voxel i runs to the patient's right and j posterior;
    the world origin is the volume centre.
    """
    sx, sy, sz = (float(s) for s in spacing_xyz)
    half = (np.asarray(shape_xyz, dtype=np.float64) - 1) / 2 * np.array([sx, sy, sz])
    return np.array([[-sx, 0, 0, half[0]], [0, -sy, 0, half[1]], [0, 0, sz, -half[2]], [0, 0, 0, 1.0]])


def write_phantom(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_xyz: Sequence[float],
    image_path: PathLike,
    label_path: PathLike,
) -> None:
    """Writes a phantom (RAS-ordered arrays) as int16 / uint8 NIfTI with `phantom_affine`."""
    affine = phantom_affine(hu.shape, spacing_xyz)
    for data, path, dtype in ((hu, image_path, np.int16), (labels, label_path, np.uint8)):
        img = nib.Nifti1Image(np.ascontiguousarray(data[::-1, ::-1, :]).astype(dtype), affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        save_nifti(img, path)


def write_synthetic_dataset(
    root: PathLike,
    num_cases: int = 10,
    shape: Sequence[int] = (160, 160, 64),
    spacing: Sequence[float] = (1.5, 1.5, 3.0),
    seed: int = 1234,
) -> list[CaseFiles]:
    """Returns the cases after writing `volume-N.nii.gz`/`segmentation-N.nii.gz` (N = 0..) under root.

    A `synthetic.json` manifest written last records the settings; when it matches and all files
    exist, nothing is regenerated.
    """
    root = pathlib.Path(root)
    settings = {
        "version": SYNTHETIC_VERSION,
        "num_cases": int(num_cases),
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "seed": int(seed),
    }
    cases = [
        CaseFiles(f"volume-{i}", root / f"volume-{i}.nii.gz", root / f"segmentation-{i}.nii.gz")
        for i in range(num_cases)
    ]
    atomic_write.sweep_stale_temps(root)  # phantoms of a generation that was killed
    manifest = root / "synthetic.json"
    try:
        current = json.loads(manifest.read_text())
    except (OSError, ValueError):
        current = None
    if current == settings and all(c.image.exists() and c.label.exists() for c in cases):
        return cases
    root.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    print(f"generating {num_cases} synthetic CT phantoms into {root} (first run only)", flush=True)
    for i, case in enumerate(cases):
        hu, labels = make_phantom(shape, spacing, seed=[int(seed), i])
        write_phantom(hu, labels, spacing, case.image, case.label)
    atomic_write.write_json(manifest, settings)
    return cases
