"""Real MR magnitude images that ship inside registry packages, as 2-D slices on a chosen matrix.

Every loader returns float32 magnitude slices ``(n, ny, nx)`` (rows = anterior→posterior or superior→inferior,
as a radiologist displays them), resampled isotropically so the whole volume's anatomy fits the matrix with a
margin and sits in its centre, and normalised per volume so that the 99.5th percentile of the anatomy is 1.

Files are found without importing the packages that carry them (``importlib.util.find_spec`` locates a Python
package; Debian packages install to their fixed ``/usr/share`` paths, :data:`MRICRON` and :data:`ITK_DATA`) and read
with nibabel and Pillow, so ``pip install --no-deps nilearn dipy`` is enough; only the DICOM knee needs ``pydicom``
to parse the file. A missing source raises :class:`SourceUnavailable` naming the Debian or PyPI package.

Subjects and splits (never split one volume, or one person, across splits)
---------------------------------------------------------------------------
===========  =======================================  ====================  ===========================
source       content                                  subject               package
===========  =======================================  ====================  ===========================
colin27      Colin27 T1 (1 mm with skull; 0.5 mm brain) colin27             Debian mricron-data
brainweb     BrainWeb T1 and PD slices                colin27 (see below)   Debian insighttoolkit5-examples
mni152       ICBM152 2009a T1 + a T2w-like contrast   mni152 (average)      PyPI nilearn
mni152-t1    the same T1 template alone               mni152 (average)      PyPI nilearn
dipy-t1      one coronal T1 slice                     dipy-t1               PyPI dipy
itk-head     real coronal T1 head, 128×128×62         itk-kmeans            Debian insighttoolkit5-examples
macaque      INIA19 rhesus macaque T1 template        inia19 (macaque)      Debian mricron-data
dipy-epi     EPI b0 volume, 128×128×10                dipy-epi              PyPI dipy
knee         1.5 T spin-echo shoulder/knee, 1024²     pydicom-mr2           PyPI pydicom-data + pydicom
===========  =======================================  ====================  ===========================

The BrainWeb phantom's anatomy *is* Colin27 (it was built from the same 27 scans of one person), so BrainWeb
cannot serve as held-out validation for a model trained on Colin27: it trains with it. ``SPLITS``:

* ``train``: colin27 (axial, coronal and sagittal slices of both volumes), brainweb (same subject, PD contrast),
  mni152 (a population average of other people, T1 and T2w-like). ``mni152-t1`` is its T1 alone, the source of
  tissue fractions for synthesised contrasts (:mod:`lab.contrasts`); it is in no split of its own.
* ``val``: dipy-t1 (another person; the training and the evaluation add its T2-weighted contrast).
* ``test``: itk-head, a real T1 head of a person in no other split (in distribution: human brain T1).
* ``ood``: macaque (another species), dipy-epi (another contrast and sequence), knee (another anatomy).

Only one real human volume (and one population average) is large enough to train on, which is the honest limit of
packaged data; the validation and test sets are small (one subject each) and results on them are reported as such.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable

import nibabel
import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F

MRICRON = Path("/usr/share/mricron/templates")
ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")


class SourceUnavailable(RuntimeError):
    """The package that ships a source's files is not installed."""


# ----------------------------------------------------------------------------------------------------------------
# File readers
# ----------------------------------------------------------------------------------------------------------------

def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file (``.nii`` or ``.nii.gz``, with nibabel). Returns the volume ``(i, j, k)`` as float32
    (scaling applied, singleton trailing axes dropped) and its 4×4 voxel-to-world affine."""
    try:
        image = nibabel.load(str(path))
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except (nibabel.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a readable NIfTI file ({error})") from None
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    return volume, np.asarray(image.affine, dtype=np.float64)


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute and flip the first three axes so that they run Left→Right, Posterior→Anterior, Inferior→Superior
    (nearest axis-aligned orientation; oblique acquisitions are not resampled). Returns the volume and its voxel
    size in mm along (R, A, S)."""
    orientation = nibabel.orientations.io_orientation(affine)  # per voxel axis: (world axis, ±1)
    if np.isnan(orientation).any():
        raise ValueError("cannot determine the volume's orientation from its affine")
    out = nibabel.orientations.apply_orientation(volume, orientation)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    spacing = tuple(float(sizes[list(orientation[:, 0]).index(axis)]) for axis in range(3))
    return np.ascontiguousarray(out), spacing


def read_png(path: str | Path) -> np.ndarray:
    """Read a PNG (grey, RGB, palette, ± alpha, 8/16 bit) as a float32 grey image ``(rows, cols)``: the mean of the
    colour channels, alpha dropped."""
    with Image.open(path) as image:
        if image.mode == "P":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3:
        pixels = pixels[..., :3 if pixels.shape[-1] >= 3 else 1].mean(axis=-1)
    return pixels


# ----------------------------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------------------------

def _debian_file(path: Path, package: str) -> Path:
    if not path.is_file():
        raise SourceUnavailable(f"{path} not found: install the Debian package `{package}` "
                                f"(apt-get install {package})")
    return path


def _python_package_file(module: str, relative: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / relative
            if candidate.is_file():
                return candidate
    raise SourceUnavailable(f"{module}/{relative} not found: install the PyPI package `{package}` "
                            f"(pip install --no-deps {package} is enough)")


# ----------------------------------------------------------------------------------------------------------------
# Slicing, centring, resampling
# ----------------------------------------------------------------------------------------------------------------

ORIENTATIONS = ("axial", "coronal", "sagittal")


def volume_slices(ras: np.ndarray, orientation: str) -> np.ndarray:
    """Slices of a RAS volume as displayed: ``(n, rows, cols)``. Axial: rows anterior→posterior, cols R→L
    (radiological); coronal: rows superior→inferior, cols R→L; sagittal: rows superior→inferior, cols A→P."""
    if orientation == "axial":
        return np.flip(np.transpose(ras, (2, 1, 0)), axis=1)
    if orientation == "coronal":
        return np.flip(np.transpose(ras, (1, 2, 0)), axis=1)
    if orientation == "sagittal":
        return np.flip(np.transpose(ras, (0, 2, 1)), axis=(1, 2))
    raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")


def _slice_spacing(spacing: tuple[float, float, float], orientation: str) -> tuple[float, float]:
    r, a, s = spacing
    return {"axial": (a, r), "coronal": (s, r), "sagittal": (s, a)}[orientation]


def fit_to_matrix(slices: np.ndarray, shape: tuple[int, int], spacing: tuple[float, float] = (1.0, 1.0),
                  fill: float = 0.85, threshold: float = 0.05) -> np.ndarray:
    """Resample slices ``(n, rows, cols)`` with pixel size ``spacing`` (mm) onto ``shape`` with square pixels.

    One bounding box for the whole stack (pixels above ``threshold`` × the 99.5th percentile in any slice) is centred
    and scaled so its larger physical side spans ``fill`` of the matrix; everything outside is cropped or
    zero-padded. Bilinear interpolation, antialiased when shrinking. Returns float32 ``(n, *shape)``."""
    n, rows, cols = slices.shape
    ref = np.percentile(slices, 99.5)
    foreground = (slices > threshold * ref).any(axis=0)
    if not foreground.any():
        raise ValueError("no anatomy above the threshold")
    ry, rx = np.nonzero(foreground.any(axis=1))[0], np.nonzero(foreground.any(axis=0))[0]
    box = slices[:, ry[0]:ry[-1] + 1, rx[0]:rx[-1] + 1]
    dy, dx = spacing
    extent = max(box.shape[1] * dy, box.shape[2] * dx)  # mm
    pixel = extent / (fill * max(shape))  # output pixel size in mm
    new_rows = max(1, int(round(box.shape[1] * dy / pixel)))
    new_cols = max(1, int(round(box.shape[2] * dx / pixel)))
    resized = F.interpolate(torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32))[:, None],
                            size=(new_rows, new_cols), mode="bilinear", align_corners=False,
                            antialias=new_rows < box.shape[1] or new_cols < box.shape[2])[:, 0].numpy()
    out = np.zeros((n, *shape), dtype=np.float32)
    # centre the box: copy the overlapping part (crops when the box is larger than the matrix)
    src, dst = [], []
    for size, target in ((new_rows, shape[0]), (new_cols, shape[1])):
        offset = (target - size) // 2
        s0, d0 = max(0, -offset), max(0, offset)
        length = min(size - s0, target - d0)
        src.append(slice(s0, s0 + length))
        dst.append(slice(d0, d0 + length))
    out[:, dst[0], dst[1]] = np.clip(resized[:, src[0], src[1]], 0.0, None)
    return out


def normalise(slices: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Scale so that the ``percentile`` of the non-zero pixels of the whole stack is 1."""
    positive = slices[slices > 0]
    ref = np.percentile(positive, percentile) if positive.size else 1.0
    return (slices / max(ref, 1e-12)).astype(np.float32)


def keep_anatomy(slices: np.ndarray, min_fraction: float = 0.3, threshold: float = 0.1) -> np.ndarray:
    """Drop slices whose foreground area is below ``min_fraction`` of the largest slice's (edge slices, caps)."""
    ref = np.percentile(slices, 99.5)
    area = (slices > threshold * ref).reshape(len(slices), -1).sum(axis=1)
    return slices[area >= min_fraction * max(int(area.max()), 1)]


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """A packaged image source. ``files()`` locates its files (raises :class:`SourceUnavailable`);
    ``load(orientations)`` returns a list of (slices ``(n, rows, cols)``, pixel spacing in mm), one entry per
    volume, contrast and orientation."""

    name: str
    subject: str
    package: str
    description: str
    files: Callable[[], list[Path]]
    load: Callable[[tuple[str, ...]], list[tuple[np.ndarray, tuple[float, float]]]]


def _mricron(*names: str) -> Callable[[], list[Path]]:
    return lambda: [_debian_file(MRICRON / n, "mricron-data") for n in names]


def _itk(*names: str) -> Callable[[], list[Path]]:
    return lambda: [_debian_file(ITK_DATA / n, "insighttoolkit5-examples") for n in names]


def _pip(module: str, package: str, *relative: str) -> Callable[[], list[Path]]:
    return lambda: [_python_package_file(module, r, package) for r in relative]


_COLIN = _mricron("ch2.nii.gz", "ch2better.nii.gz")
_MACAQUE = _mricron("inia19-t1-brain.nii.gz")
_BRAINWEB = _itk("BrainT1Slice.png", "BrainProtonDensitySlice.png")
_ITK_HEAD = _itk("KmeansTest_T1UCharRaw.nii.gz")
_MNI = _pip("nilearn", "nilearn", *(f"datasets/data/mni_icbm152_{t}_tal_nlin_sym_09a_converted.nii.gz"
                                     for t in ("t1", "gm", "wm")))
_DIPY_T1 = _pip("dipy", "dipy", "data/files/t1_coronal_slice.npy")
_DIPY_EPI = _pip("dipy", "dipy", "data/files/S0_10slices.nii.gz")


def _knee_files() -> list[Path]:
    files = _pip("data_store", "pydicom-data", "data/MR2_UNCI.dcm")()
    if importlib.util.find_spec("pydicom") is None:
        raise SourceUnavailable("the knee image needs the PyPI package `pydicom` to parse DICOM")
    return files


def _stacks(volume: np.ndarray, affine: np.ndarray, orientations: tuple[str, ...]):
    ras, spacing = to_ras(volume, affine)
    return [(volume_slices(ras, o), _slice_spacing(spacing, o)) for o in orientations]


def _nifti_loader(files: Callable[[], list[Path]], fixed: tuple[str, ...] | None = None):
    """Every file's volume, sliced in each requested orientation (or in the ``fixed`` ones)."""
    def load(orientations):
        return [s for path in files() for s in _stacks(*read_nifti(path), fixed or orientations)]
    return load


def _load_brainweb(orientations):
    # 2-D axial slices at 1 mm; each contrast is its own stack.
    return [(read_png(path)[None], (1.0, 1.0)) for path in _BRAINWEB()]


def _load_mni152_t1(orientations):
    t1, affine = read_nifti(_MNI()[0])
    return _stacks(t1, affine, orientations)


def _load_mni152(orientations):
    t1_path, gm_path, wm_path = _MNI()
    t1, affine = read_nifti(t1_path)
    gm, wm = read_nifti(gm_path)[0], read_nifti(wm_path)[0]
    gm, wm = gm / max(gm.max(), 1e-6), wm / max(wm.max(), 1e-6)  # probability maps stored as 0…255
    # a T2w-like contrast: CSF bright, GM > WM; CSF ≈ brain − GM − WM inside the (brain-extracted) T1 template
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * (t1 > 0)
    t2 = 1.0 * csf + 0.6 * gm + 0.35 * wm
    return _stacks(t1, affine, orientations) + _stacks(t2, affine, orientations)


def _load_dipy_t1(orientations):
    image = np.load(_DIPY_T1()[0]).astype(np.float32)
    return [(np.flip(image.T, axis=0)[None].copy(), (1.0, 1.0))]


def _load_knee(orientations):
    import pydicom

    ds = pydicom.dcmread(_knee_files()[0])
    spacing = tuple(float(s) for s in getattr(ds, "PixelSpacing", (1.0, 1.0)))
    return [(ds.pixel_array.astype(np.float32)[None], spacing)]


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("colin27", "colin27", "mricron-data (apt)", "Colin27 T1: with skull at 1 mm, brain at 0.5 mm",
           _COLIN, _nifti_loader(_COLIN)),
    Source("brainweb", "colin27", "insighttoolkit5-examples (apt)", "BrainWeb T1 and PD slices (Colin27 anatomy)",
           _BRAINWEB, _load_brainweb),
    Source("mni152", "mni152", "nilearn (pip)", "MNI ICBM152 2009a T1 and a T2w-like synthesis", _MNI, _load_mni152),
    Source("mni152-t1", "mni152", "nilearn (pip)", "MNI ICBM152 2009a T1 alone (for tissue fractions)", _MNI,
           _load_mni152_t1),
    Source("dipy-t1", "dipy-t1", "dipy (pip)", "coronal T1 slice", _DIPY_T1, _load_dipy_t1),
    Source("itk-head", "itk-kmeans", "insighttoolkit5-examples (apt)", "real coronal T1 head",
           _ITK_HEAD, _nifti_loader(_ITK_HEAD)),
    Source("macaque", "inia19", "mricron-data (apt)", "INIA19 rhesus macaque T1 brain template",
           _MACAQUE, _nifti_loader(_MACAQUE)),
    Source("dipy-epi", "dipy-epi", "dipy (pip)", "EPI b0 volume (axial)", _DIPY_EPI,
           _nifti_loader(_DIPY_EPI, fixed=("axial",))),
    Source("knee", "pydicom-mr2", "pydicom-data + pydicom (pip)", "1.5 T spin-echo shoulder/knee",
           _knee_files, _load_knee),
)}

SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("colin27", "brainweb", "mni152"),
    "val": ("dipy-t1",),
    "test": ("itk-head",),
    "ood": ("macaque", "dipy-epi", "knee"),
}

DEFAULT_ORIENTATIONS = {"train": ORIENTATIONS, "val": ("axial",), "test": ("coronal",), "ood": ("axial",)}


def available(name: str) -> bool:
    """Whether a source's files can be found (reads nothing)."""
    try:
        SOURCES[name].files()
        return True
    except SourceUnavailable:
        return False


def load_source(name: str, shape: tuple[int, int] = (320, 320), orientations: tuple[str, ...] = ("axial",),
                step: int = 1, min_fraction: float = 0.3) -> np.ndarray:
    """Magnitude slices of one source on ``shape``: float32 ``(n, ny, nx)``, anatomy centred, normalised per stack.

    ``orientations``: which slicing of 3-D volumes (2-D sources ignore it); ``step``: keep every step-th slice;
    ``min_fraction``: drop slices with less anatomy than this fraction of the stack's largest slice."""
    if name not in SOURCES:
        raise KeyError(f"unknown image source {name!r}; known: {', '.join(SOURCES)}")
    out = []
    for stack, spacing in SOURCES[name].load(tuple(orientations)):
        stack = keep_anatomy(stack, min_fraction) if len(stack) > 1 else stack
        stack = stack[len(stack) % step // 2::step] if step > 1 else stack
        out.append(normalise(fit_to_matrix(stack, shape, spacing)))
    return np.concatenate(out, axis=0)


def load_split(split: str, shape: tuple[int, int] = (320, 320), orientations: tuple[str, ...] | None = None,
               step: int = 1, skip_missing: bool = True) -> dict[str, np.ndarray]:
    """Slices of every source of ``split`` (see the module docstring), ``{source: (n, ny, nx)}``.
    Missing sources are skipped when ``skip_missing`` (the result may be empty) and raise otherwise."""
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    orientations = DEFAULT_ORIENTATIONS[split] if orientations is None else orientations
    out = {}
    for name in SPLITS[split]:
        try:
            out[name] = load_source(name, shape, orientations, step=step)
        except SourceUnavailable:
            if not skip_missing:
                raise
    return out


def subjects(split: str) -> set[str]:
    """The subjects a split draws on."""
    return {SOURCES[name].subject for name in SPLITS[split]}
