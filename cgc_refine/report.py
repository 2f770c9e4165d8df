"""Visual reports: a slice montage with lesion contours and a short HTML page.

The montage shows the slices with the most lesion voxels (the image in grey, windowed on the
percentiles of its non-zero voxels) with the contours of the prior, the refined mask and,
when given, the ground truth. Panels are drawn in millimetres, so anisotropic voxels (e.g.
0.47 x 0.47 x 8 mm) keep their true proportions.

When the voxel-to-world affine is known (a :class:`~cgc_refine.io.Volume`, or ``affine=``),
the arrays are reoriented for display only to the closest canonical (RAS) orientation, so
an LPS, LAS or RAS file of the same head gives the same picture: axial panels with anterior
at the top, coronal and sagittal panels with superior at the top. The default
``orientation="neurological"`` puts the patient's right on the right of the panel
(``"radiological"`` on the left, as a scanner console does); every panel's edges are
labelled R/L, A/P, S/I and the convention is written under the panels. Oblique acquisitions
are shown along their closest canonical axes, not resampled. Without an affine (plain
arrays), or with ``orientation="voxel"``, panels are shown in voxel order (first in-plane
axis to the right, second upwards), unlabelled.

Matplotlib is an optional dependency (``pip install "cgc_refine[report]"``); it is imported
only when a montage is drawn, and through its object-oriented API with the Agg canvas, so
``pyplot`` is never imported and an interactive session's backend is left alone.
"""

from __future__ import annotations

import datetime
import html
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ._utils import atomic_write, check_writable_target, jsonable
from ._version import __version__
from .exceptions import (
    CGCRefineError,
    InvalidImageError,
    SpaceMismatchError,
)

__all__ = [
    "ORIENTATIONS",
    "OVERLAY_COLORS",
    "MissingDependencyError",
    "lesion_slices",
    "panel_extent",
    "render_montage",
    "require_matplotlib",
    "side_labels",
    "write_html_report",
]

logger = logging.getLogger(__name__)

#: Contour colours of the overlays (prior yellow, refined red, truth green).
OVERLAY_COLORS: dict[str, str] = {"prior": "#ffd21f", "refined": "#ff2a2a", "truth": "#2bd92b"}
_OVERLAY_LABELS = {"prior": "prior", "refined": "refined", "truth": "ground truth"}
# (line width, line style): the truth is drawn wide underneath and the prior dashed, so that
# contours lying on top of each other stay visible
_OVERLAY_STYLES: dict[str, tuple[float, Any]] = {"truth": (2.2, "solid"), "prior": (1.1, "dashed"), "refined": (1.1, "solid")}
_MIN_MATPLOTLIB = (3, 6)
#: Display conventions of :func:`render_montage`.
ORIENTATIONS = ("neurological", "radiological", "voxel")
_POSITIVE, _NEGATIVE = "RAS", "LPI"  # the letter at the high and the low end of each RAS axis
_PANEL_INCHES = 3.0  # the longer side of one panel
_MIN_PANEL_INCHES = 0.6  # the shorter side is never drawn thinner than this
_DPI = 100


class MissingDependencyError(CGCRefineError, ImportError):
    """An optional dependency needed for the requested feature is not installed."""


# --------------------------------------------------------------------------------------------
# Matplotlib
# --------------------------------------------------------------------------------------------


def require_matplotlib(feature: str = "--report") -> None:
    """Fail fast when matplotlib (>= 3.6) cannot be imported.

    Parameters
    ----------
    feature : str
        What needs matplotlib, named in the error message.

    Raises
    ------
    MissingDependencyError
        If matplotlib is missing, broken or older than 3.6.
    """
    hint = f'{feature} needs matplotlib: pip install "cgc_refine[report]"'
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError(hint) from exc
    version = str(getattr(matplotlib, "__version__", "0"))
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < _MIN_MATPLOTLIB:
        raise MissingDependencyError(
            f"{hint} (matplotlib {version} is installed; version 3.6 or newer is needed)"
        )


def _agg_figure(width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib Figure on its own Agg canvas (pyplot and the global backend untouched)."""
    require_matplotlib("render_montage")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # a broken installation
        raise MissingDependencyError(
            'render_montage needs matplotlib: pip install "cgc_refine[report]"'
        ) from exc
    figure = Figure(figsize=(width, height), dpi=_DPI, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    return figure, canvas


# --------------------------------------------------------------------------------------------
# Checking arrays
# --------------------------------------------------------------------------------------------


def _check_axis(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= int(axis) <= 2:
        raise ValueError(f"axis must be 0, 1 or 2 (a voxel axis of the 3-D volume), got {axis!r}")
    return int(axis) % 3


def _as_3d(array: Any, name: str) -> np.ndarray:
    """A finite float 3-D array; a (1, X, Y, Z) or (C, X, Y, Z) array gives its first channel."""
    data = np.asarray(getattr(array, "data", array))
    if data.dtype == object or data.dtype.kind not in "biuf":
        raise InvalidImageError(f"{name} must be a numeric array, got dtype {data.dtype}")
    if data.ndim == 4:
        data = data[0]
    if data.ndim != 3:
        raise InvalidImageError(
            f"{name} must be a 3-D array (or a (C, X, Y, Z) volume), got shape {data.shape}"
        )
    if min(data.shape) < 1:
        raise InvalidImageError(f"{name} has an empty axis (shape {data.shape})")
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data


def _check_spacing(spacing: Any) -> tuple[float, float, float]:
    values = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InvalidImageError(
            f"spacing must be three positive voxel sizes in mm, got {spacing!r}; pass e.g. "
            "volume.spacing"
        )
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Slice choice and geometry
# --------------------------------------------------------------------------------------------


def _central_slices(size: int, n: int) -> list[int]:
    """``n`` slices evenly spread around the middle of an axis of ``size`` slices."""
    n = min(n, size)
    picks = [round((size - 1) * (i + 1) / (n + 1)) for i in range(n)]
    chosen: list[int] = []
    for index in picks:
        while index in chosen and index + 1 < size:
            index += 1
        if index not in chosen:
            chosen.append(index)
    for index in range(size):  # only for tiny axes where rounding collided
        if len(chosen) >= n:
            break
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def _pick_spread(order: Sequence[int], n: int, chosen: list[int]) -> None:
    """Add candidates in ``order`` to ``chosen``: first never next to a chosen one, then any."""
    for gap in (2, 1):
        for index in order:
            if len(chosen) >= n:
                return
            if index not in chosen and all(abs(index - other) >= gap for other in chosen):
                chosen.append(index)


def lesion_slices(
    masks: Any | Sequence[Any],
    n: int = 3,
    axis: int = 2,
) -> list[int]:
    """The slices that show the most lesion, spread out.

    Parameters
    ----------
    masks : array-like or sequence of array-like
        One 3-D mask or probability map, or several on the same grid (``None`` entries are
        skipped). A voxel is lesion when its value is ``>= 0.5`` in any of them.
    n : int
        How many slices (at most the number of slices along ``axis``).
    axis : int
        The voxel axis the slices are taken along (default 2, the third axis).

    Returns
    -------
    list of int
        Sorted slice indices. The slices with the most lesion voxels come first, skipping a
        slice next to one already chosen as long as other lesion slices remain; when fewer
        than ``n`` slices hold lesion, slices near the lesions fill up the list. Without any
        lesion voxel: ``n`` slices evenly spread around the centre of the axis.

    Raises
    ------
    ValueError
        If ``n`` is not a positive integer or ``axis`` is not 0, 1 or 2, or no mask is given.
    SpaceMismatchError
        If the masks have different shapes.
    InvalidImageError
        If a mask is not a 3-D numeric array.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    axis = _check_axis(axis)
    if isinstance(masks, np.ndarray) or hasattr(masks, "__array__") or not isinstance(masks, Sequence):
        items = [masks]
    else:
        items = list(masks)
    arrays = [_as_3d(m, "mask") for m in items if m is not None]
    if not arrays:
        raise ValueError("lesion_slices needs at least one mask; got none (all None)")
    shape = arrays[0].shape
    for other in arrays[1:]:
        if other.shape != shape:
            raise SpaceMismatchError(
                f"masks have different shapes {shape} and {other.shape}; pass masks on one grid"
            )
    union = np.zeros(shape, dtype=bool)
    for array in arrays:
        union |= array >= 0.5
    size = shape[axis]
    n = min(int(n), size)
    other_axes = tuple(a for a in range(3) if a != axis)
    counts = union.sum(axis=other_axes)
    if not counts.any():
        return _central_slices(size, n)
    lesion = [int(i) for i in np.flatnonzero(counts)]
    chosen: list[int] = []
    _pick_spread(sorted(lesion, key=lambda i: (-int(counts[i]), i)), n, chosen)
    if len(chosen) < n:
        centre = float((np.arange(size) * counts).sum() / counts.sum())
        rest = sorted((i for i in range(size) if counts[i] == 0), key=lambda i: (abs(i - centre), i))
        _pick_spread(rest, n, chosen)
    return sorted(chosen)


def panel_extent(
    shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0), axis: int = 2
) -> tuple[float, float, float, float]:
    """The ``imshow`` extent (mm) of one slice, so that a panel keeps the voxels' proportions.

    Parameters
    ----------
    shape : sequence of 3 int
        The volume's voxel grid.
    spacing : sequence of 3 float
        Voxel size in mm along each array axis.
    axis : int
        The axis the slices are taken along; the other two span the panel (the first one
        horizontally, the second vertically).

    Returns
    -------
    tuple of 4 float
        ``(0, width_mm, 0, height_mm)``; the panel's aspect ratio is ``height_mm / width_mm``.
    """
    axis = _check_axis(axis)
    size = tuple(int(s) for s in shape)
    if len(size) != 3:
        raise InvalidImageError(f"shape must have 3 entries, got {shape!r}")
    sp = _check_spacing(spacing)
    horizontal, vertical = (a for a in range(3) if a != axis)
    return (0.0, size[horizontal] * sp[horizontal], 0.0, size[vertical] * sp[vertical])


def _canonical_transform(affine: Any) -> np.ndarray:
    """The nibabel orientation transform from the voxel axes of ``affine`` to RAS (closest
    canonical axes): row ``i`` holds the RAS axis voxel axis ``i`` goes to and ``-1`` when it
    is reversed."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InvalidImageError(f"affine must be a finite 4 x 4 matrix, got shape {matrix.shape}")
    return ornt_transform(io_orientation(matrix), axcodes2ornt("RAS"))


def side_labels(axis: int, orientation: str = "neurological") -> dict[str, str]:
    """The anatomical letters at the edges of a canonical panel sliced along ``axis``.

    Parameters
    ----------
    axis : int
        RAS axis the slices are taken along: 0 sagittal, 1 coronal, 2 axial.
    orientation : {"neurological", "radiological"}
        Neurological: the high end of the horizontal axis (R, or A in sagittal panels) on
        the right; radiological: mirrored left-right in axial and coronal panels, so that the
        patient's right is on the viewer's left. Sagittal panels are the same in both.

    Returns
    -------
    dict
        Letters for ``"left"``, ``"right"``, ``"bottom"`` and ``"top"``.
    """
    axis = _check_axis(axis)
    if orientation not in ("neurological", "radiological"):
        raise ValueError(f"orientation must be 'neurological' or 'radiological', got {orientation!r}")
    horizontal, vertical = (a for a in range(3) if a != axis)
    left, right = _NEGATIVE[horizontal], _POSITIVE[horizontal]
    if orientation == "radiological" and horizontal == 0:
        left, right = right, left
    return {"left": left, "right": right, "bottom": _NEGATIVE[vertical], "top": _POSITIVE[vertical]}


def _window(image: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    """Grey-level window: the 0.5-99.5 percentiles of the non-zero voxels (or ``window``)."""
    if window is not None:
        low, high = (float(v) for v in window)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"window must be two finite numbers (low < high), got {window!r}")
        return low, high
    values = image[image != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return low, high


def _panel_inches(width_mm: float, height_mm: float) -> tuple[float, float]:
    scale = _PANEL_INCHES / max(width_mm, height_mm)
    return max(width_mm * scale, _MIN_PANEL_INCHES), max(height_mm * scale, _MIN_PANEL_INCHES)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Montage
# --------------------------------------------------------------------------------------------


def render_montage(
    image: Any,
    path: str | os.PathLike[str],
    *,
    prior: Any | None = None,
    refined: Any | None = None,
    truth: Any | None = None,
    spacing: Sequence[float] | None = None,
    slices: Sequence[int] | None = None,
    title: str | None = None,
    axis: int = 2,
    n_slices: int = 3,
    window: Sequence[float] | None = None,
    overwrite: bool = False,
    affine: Any | None = None,
    orientation: str = "neurological",
) -> Path:
    """Draw a PNG montage of lesion slices with the contours of prior, refined mask and truth.

    Parameters
    ----------
    image : array-like or Volume
        The 3-D image (a ``(C, X, Y, Z)`` array or a :class:`~cgc_refine.io.Volume` shows its
        first channel).
    path : path
        The PNG file to write (atomically: a temporary file, then a rename).
    prior, refined, truth : array-like, optional
        Masks or probability maps on the image grid; each is drawn as its 0.5 contour
        (prior yellow, refined red, truth green) and named in the legend.
    spacing : sequence of 3 float, optional
        Voxel size in mm (default: the Volume's spacing, else 1 mm); panels are drawn in mm.
    slices : sequence of int, optional
        The slices to show (default: :func:`lesion_slices` of the overlays), as the panels
        label them: voxel indices of the input along the voxel axis shown as ``axis``.
    title : str, optional
        A line above the panels.
    axis : int
        The axis the slices are taken along (default 2): with an affine, a canonical axis
        (0 sagittal, 1 coronal, 2 axial); without one, a voxel axis.
    n_slices : int
        How many slices to choose when ``slices`` is not given.
    window : (float, float), optional
        Grey-level range (e.g. ``(0, 80)`` HU for head CT); default: the 0.5 and 99.5
        percentiles of the non-zero voxels.
    overwrite : bool
        Replace an existing file.
    affine : array-like, optional
        The (4, 4) voxel-to-world matrix (default: the Volume's ``affine``; none for a plain
        array). With it, the panels are drawn in the closest canonical orientation and
        labelled (see the module documentation).
    orientation : {"neurological", "radiological", "voxel"}
        With an affine: the patient's right on the right (neurological, default) or on the
        left (radiological) of axial and coronal panels; ``"voxel"`` ignores the affine.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    MissingDependencyError
        If matplotlib is not installed.
    InvalidImageError, SpaceMismatchError
        If the image is not 3-D, an overlay is on another grid or the affine is not 4 x 4.
    ValueError
        If a slice index is out of range or ``orientation`` is unknown.
    OutputExistsError, OutputNotWritableError
        If the file exists (without ``overwrite``) or cannot be written.
    """
    require_matplotlib("render_montage")
    out = Path(os.fspath(path))
    axis = _check_axis(axis)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if spacing is None:
        spacing = getattr(image, "spacing", (1.0, 1.0, 1.0))
    sp = _check_spacing(spacing)
    if affine is None:
        affine = getattr(image, "affine", None)
    data = _as_3d(image, "image")
    transform = None if affine is None or orientation == "voxel" else _canonical_transform(affine)
    overlays: dict[str, np.ndarray] = {}
    # drawing order: truth underneath, the refined mask on top
    for name, value in (("truth", truth), ("prior", prior), ("refined", refined)):
        if value is None:
            continue
        array = _as_3d(value, name)
        if array.shape != data.shape:
            raise SpaceMismatchError(
                f"{name} has shape {array.shape} but the image has {data.shape}; pass masks on "
                "the image grid"
            )
        overlays[name] = array
    # the voxel axis shown as `axis`, and whether it runs backwards in the display
    source_axis, reversed_axis = axis, False
    if transform is not None:
        from nibabel.orientations import apply_orientation

        data = apply_orientation(data, transform)
        overlays = {name: apply_orientation(array, transform) for name, array in overlays.items()}
        moved = [0.0, 0.0, 0.0]
        for voxel_axis, (target, _) in enumerate(transform):
            moved[int(target)] = sp[voxel_axis]
        sp = (moved[0], moved[1], moved[2])
        source_axis = int(np.flatnonzero(transform[:, 0] == axis)[0])
        reversed_axis = bool(transform[source_axis, 1] < 0)
    size = data.shape[axis]

    def as_displayed(index: int) -> int:  # the input's voxel index <-> the displayed array's
        return size - 1 - index if reversed_axis else index

    if slices is None:
        chosen = lesion_slices(list(overlays.values()), n=n_slices, axis=axis) if overlays else \
            _central_slices(size, min(int(n_slices), size))
    else:
        given = [int(s) for s in slices]
        if not given:
            raise ValueError("slices is empty; pass at least one slice index or None")
        bad = [s for s in given if not 0 <= s < size]
        if bad:
            raise ValueError(f"slice(s) {bad} out of range: axis {axis} has {size} slices (0-{size - 1})")
        chosen = [as_displayed(s) for s in given]
    check_writable_target(out, overwrite)
    labels = None if transform is None else side_labels(axis, orientation)

    low, high = _window(data, window)
    extent = panel_extent(data.shape, sp, axis)
    horizontal, vertical = (a for a in range(3) if a != axis)
    panel_w, panel_h = _panel_inches(extent[1], extent[3])
    gap, side = 0.08, 0.08
    top = 0.42 if title else 0.08
    bottom = 0.36 if overlays else (0.24 if labels else 0.08)
    width = side * 2 + len(chosen) * panel_w + (len(chosen) - 1) * gap
    height = top + panel_h + bottom
    figure, canvas = _agg_figure(width, height)
    centres_x = (np.arange(data.shape[horizontal]) + 0.5) * sp[horizontal]
    centres_y = (np.arange(data.shape[vertical]) + 0.5) * sp[vertical]
    for column, index in enumerate(chosen):
        left = side + column * (panel_w + gap)
        ax = figure.add_axes((left / width, bottom / height, panel_w / width, panel_h / height))
        ax.set_facecolor("black")
        # array[a, b] -> rows b (upwards), columns a (to the right)
        plane = np.take(data, index, axis=axis).T
        ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent,
                  interpolation="antialiased", aspect="equal")
        for name, array in overlays.items():
            section = np.take(array, index, axis=axis).T
            if section.min() < 0.5 <= section.max():
                ax.contour(centres_x, centres_y, section, levels=[0.5],
                           colors=[OVERLAY_COLORS[name]], linewidths=_OVERLAY_STYLES[name][0],
                           linestyles=_OVERLAY_STYLES[name][1])
        if labels is not None and labels["left"] == "R":  # radiological: mirrored left-right
            ax.set_xlim(extent[1], extent[0])
        else:
            ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        shown = as_displayed(index)
        where = "" if source_axis == axis else f" of voxel axis {source_axis}"
        ax.text(0.03, 0.97, f"slice {shown}{where}", transform=ax.transAxes, color="white",
                fontsize=8, va="top", ha="left")
        if labels is not None:
            for edge, (x, y, ha, va) in {"left": (0.02, 0.5, "left", "center"),
                                         "right": (0.98, 0.5, "right", "center"),
                                         "bottom": (0.5, 0.02, "center", "bottom"),
                                         "top": (0.5, 0.98, "center", "top")}.items():
                ax.text(x, y, labels[edge], transform=ax.transAxes, color="#8fd3ff",
                        fontsize=8, fontweight="bold", ha=ha, va=va)
    if title:
        figure.text(0.5, 1.0 - (top / 2) / height, title, color="white", fontsize=10,
                    ha="center", va="center")
    if labels is not None:
        note = ("radiological: patient's right on the left" if orientation == "radiological"
                else "neurological: patient's right on the right")
        figure.text(1.0 - side / width, 0.03 / height, note, color="#8fd3ff", fontsize=6,
                    ha="right", va="bottom")
    if overlays:
        from matplotlib.lines import Line2D

        names = [name for name in ("prior", "refined", "truth") if name in overlays]
        handles = [Line2D([0], [0], color=OVERLAY_COLORS[name], linewidth=_OVERLAY_STYLES[name][0],
                          linestyle=_OVERLAY_STYLES[name][1]) for name in names]
        labels = [_OVERLAY_LABELS[name] for name in names]
        figure.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False,
                      fontsize=8, labelcolor="white", bbox_to_anchor=(0.5, 0.0),
                      handlelength=1.6, columnspacing=1.2)

    def write(handle: Any) -> None:
        canvas.print_png(handle)

    atomic_write(out, write, overwrite=overwrite, binary=True)
    logger.info("wrote montage of slices %s (axis %d, %s) to %s", [as_displayed(i) for i in chosen],
                axis, orientation if transform is not None else "voxel order", out)
    return out


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return "n/a"
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        if number != 0 and (abs(number) >= 1e6 or abs(number) < 1e-3):
            return f"{number:.3e}"
        if abs(number) >= 1000:
            return f"{number:.1f}"
        return f"{number:.4g}"
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return json.dumps(jsonable(value, strict=True))


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em;
       color: #222; max-width: 70em; }
h1 { font-size: 1.3em; }
img { max-width: 100%; height: auto; background: #000; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.85em; }
"""


def write_html_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    numbers: Mapping[str, object],
    image_name: str,
    sidecar: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a short self-contained HTML page: the montage and a table of numbers.

    Parameters
    ----------
    path : path
        The HTML file to write (atomically).
    title : str
        The page title and heading.
    numbers : mapping of str to object
        Rows of the table (e.g. lesion volumes in ml, Dice, settings), in order; floats are
        rounded for display, NaN shows as ``n/a``.
    image_name : str
        The montage PNG, linked relative to the page (normally its file name in the same
        folder).
    sidecar : mapping, optional
        Provenance (e.g. the JSON sidecar) shown as JSON in a collapsed section.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    OutputExistsError, OutputNotWritableError
        If the file exists (without ``overwrite``) or cannot be written.

    Notes
    -----
    Every text is escaped with :func:`html.escape`; the page has no script and loads nothing
    but the PNG.
    """
    out = Path(os.fspath(path))
    esc = html.escape
    rows = []
    for key, value in numbers.items():
        text = _format_value(value)
        numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        cell = f'<td class="num">{esc(text)}</td>' if numeric else f"<td>{esc(text)}</td>"
        rows.append(f"<tr><th scope=\"row\">{esc(str(key))}</th>{cell}</tr>")
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        f'<p><img src="{esc(quote(image_name))}" alt="{esc("slice montage: " + title)}"></p>',
        ('<p class="note">Contours at 0.5: prior yellow, refined red, ground truth green. '
         "Panels are in voxel order, drawn in millimetres.</p>"),
        "<table>",
        "<tbody>",
        *rows,
        "</tbody>",
        "</table>",
    ]
    if sidecar is not None:
        text = json.dumps(jsonable(dict(sidecar), strict=True), indent=2, allow_nan=False)
        parts += ["<details>", "<summary>Settings and provenance</summary>",
                  f"<pre>{esc(text)}</pre>", "</details>"]
    parts += [
        f'<p class="note">cgc_refine {esc(__version__)}, {esc(created)}</p>',
        "</body>",
        "</html>",
        "",
    ]
    document = "\n".join(parts)
    atomic_write(out, lambda handle: handle.write(document), overwrite=overwrite, binary=False)
    logger.info("wrote HTML report %s", out)
    return out
