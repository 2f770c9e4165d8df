"""The slice montage: a PNG of lesion slices with the contours of prior, refined mask and truth.

Panels are drawn in millimetres, so anisotropic voxels keep their true proportions. With an
affine the arrays are reoriented for display only (see :mod:`cgc_refine.report`). Matplotlib
is imported only when a montage is drawn, through its object-oriented API with the Agg
canvas, so ``pyplot`` is never imported and an interactive session's backend is left alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._utils import atomic_write, check_writable_target
from .._validation import check_spacing
from ..exceptions import MissingDependencyError, SpaceMismatchError
from .slices import ORIENTATIONS, lesion_slices, panel_extent, side_labels
from .slices import _as_float_3d, _canonical_transform, _central_slices, _check_axis

__all__ = ["OVERLAY_COLORS", "render_montage", "require_matplotlib"]

logger = logging.getLogger("cgc_refine.report")

#: Contour colours of the overlays (prior yellow, refined red, truth green).
OVERLAY_COLORS: dict[str, str] = {"prior": "#ffd21f", "refined": "#ff2a2a", "truth": "#2bd92b"}
_OVERLAY_LABELS = {"prior": "prior", "refined": "refined", "truth": "ground truth"}
# (line width, line style): the truth is drawn wide underneath and the prior dashed, so that
# contours lying on top of each other stay visible
_OVERLAY_STYLES: dict[str, tuple[float, Any]] = {
    "truth": (2.2, "solid"),
    "prior": (1.1, "dashed"),
    "refined": (1.1, "solid"),
}
_MIN_MATPLOTLIB = (3, 6)
_PANEL_INCHES = 3.0  # the longer side of one panel
_MIN_PANEL_INCHES = 0.6  # the shorter side is never drawn thinner than this
_DPI = 100
_GAP, _SIDE = 0.08, 0.08  # inches between panels, and at the left and right edges
# Where the side letters sit in a panel (axes fractions and alignment).
_EDGE_PLACES = {
    "left": (0.02, 0.5, "left", "center"),
    "right": (0.98, 0.5, "right", "center"),
    "bottom": (0.5, 0.02, "center", "bottom"),
    "top": (0.5, 0.98, "center", "top"),
}
_LABEL_COLOR = "#8fd3ff"


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
# What is shown
# --------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """The arrays of a montage in display order, and how to label them.

    ``data`` and ``overlays`` are the image and the masks as displayed (reoriented to RAS
    when an affine is used); ``axis`` is the displayed axis the slices are taken along,
    ``source_axis`` the input's voxel axis shown as ``axis`` and ``reversed_axis`` whether it
    runs backwards in the display. ``labels`` are the side letters (None without an affine).
    """

    data: np.ndarray
    overlays: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    axis: int
    source_axis: int
    reversed_axis: bool
    labels: dict[str, str] | None
    orientation: str

    @property
    def size(self) -> int:
        """The number of slices along ``axis``."""
        return int(self.data.shape[self.axis])

    def as_displayed(self, index: int) -> int:
        """The input's voxel index of a displayed slice, or the reverse (an involution)."""
        return self.size - 1 - index if self.reversed_axis else index


def _overlays(data: np.ndarray, masks: dict[str, Any]) -> dict[str, np.ndarray]:
    """The given masks as float 3-D arrays on the image grid, truth first, refined last."""
    overlays: dict[str, np.ndarray] = {}
    # drawing order: truth underneath, the refined mask on top
    for name in ("truth", "prior", "refined"):
        value = masks.get(name)
        if value is None:
            continue
        array = _as_float_3d(value, name)
        if array.shape != data.shape:
            raise SpaceMismatchError(
                f"{name} has shape {array.shape} but the image has {data.shape}; pass masks on "
                "the image grid"
            )
        overlays[name] = array
    return overlays


def _scene(
    image: Any,
    masks: dict[str, Any],
    *,
    spacing: Sequence[float] | None,
    affine: Any | None,
    axis: int,
    orientation: str,
) -> _Scene:
    """Check the inputs of :func:`render_montage` and put them in display order."""
    axis = _check_axis(axis)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    if spacing is None:
        spacing = getattr(image, "spacing", (1.0, 1.0, 1.0))
    sp = check_spacing(spacing, hint="; pass e.g. volume.spacing")
    if affine is None:
        affine = getattr(image, "affine", None)
    data = _as_float_3d(image, "image")
    transform = None if affine is None or orientation == "voxel" else _canonical_transform(affine)
    overlays = _overlays(data, masks)
    if transform is None:
        return _Scene(data, overlays, sp, axis, axis, False, None, orientation)
    from nibabel.orientations import apply_orientation

    data = apply_orientation(data, transform)
    overlays = {name: apply_orientation(array, transform) for name, array in overlays.items()}
    moved = [0.0, 0.0, 0.0]
    for voxel_axis, (target, _) in enumerate(transform):
        moved[int(target)] = sp[voxel_axis]
    source_axis = int(np.flatnonzero(transform[:, 0] == axis)[0])
    return _Scene(
        data,
        overlays,
        (moved[0], moved[1], moved[2]),
        axis,
        source_axis,
        bool(transform[source_axis, 1] < 0),
        side_labels(axis, orientation),
        orientation,
    )


def _chosen_slices(scene: _Scene, slices: Sequence[int] | None, n_slices: int) -> list[int]:
    """Displayed indices of the slices to show: ``slices`` (input indices) or a choice."""
    size, axis = scene.size, scene.axis
    if slices is None:
        if scene.overlays:
            return lesion_slices(list(scene.overlays.values()), n=n_slices, axis=axis)
        return _central_slices(size, min(int(n_slices), size))
    given = [int(s) for s in slices]
    if not given:
        raise ValueError("slices is empty; pass at least one slice index or None")
    bad = [s for s in given if not 0 <= s < size]
    if bad:
        raise ValueError(f"slice(s) {bad} out of range: axis {axis} has {size} slices (0-{size - 1})")
    return [scene.as_displayed(s) for s in given]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _draw_panel(
    ax: Any,
    scene: _Scene,
    index: int,
    extent: tuple[float, float, float, float],
    grey: tuple[float, float],
) -> None:
    """Draw the displayed slice ``index``: the image, the overlay contours and the labels."""
    axis, sp = scene.axis, scene.spacing
    horizontal, vertical = (a for a in range(3) if a != axis)
    ax.set_facecolor("black")
    # array[a, b] -> rows b (upwards), columns a (to the right)
    plane = np.take(scene.data, index, axis=axis).T
    ax.imshow(plane, cmap="gray", vmin=grey[0], vmax=grey[1], origin="lower", extent=extent,
              interpolation="antialiased", aspect="equal")
    centres_x = (np.arange(scene.data.shape[horizontal]) + 0.5) * sp[horizontal]
    centres_y = (np.arange(scene.data.shape[vertical]) + 0.5) * sp[vertical]
    for name, array in scene.overlays.items():
        section = np.take(array, index, axis=axis).T
        if section.min() < 0.5 <= section.max():
            ax.contour(centres_x, centres_y, section, levels=[0.5],
                       colors=[OVERLAY_COLORS[name]], linewidths=_OVERLAY_STYLES[name][0],
                       linestyles=_OVERLAY_STYLES[name][1])
    labels = scene.labels
    if labels is not None and labels["left"] == "R":  # radiological: mirrored left-right
        ax.set_xlim(extent[1], extent[0])
    else:
        ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    where = "" if scene.source_axis == axis else f" of voxel axis {scene.source_axis}"
    ax.text(0.03, 0.97, f"slice {scene.as_displayed(index)}{where}", transform=ax.transAxes,
            color="white", fontsize=8, va="top", ha="left")
    if labels is not None:
        for edge, (x, y, ha, va) in _EDGE_PLACES.items():
            ax.text(x, y, labels[edge], transform=ax.transAxes, color=_LABEL_COLOR,
                    fontsize=8, fontweight="bold", ha=ha, va=va)


def _draw_captions(
    figure: Any, scene: _Scene, title: str | None, size: tuple[float, float], top: float
) -> None:
    """The title above the panels, the orientation note and the legend below them."""
    width, height = size
    if title:
        figure.text(0.5, 1.0 - (top / 2) / height, title, color="white", fontsize=10,
                    ha="center", va="center")
    if scene.labels is not None:
        note = ("radiological: patient's right on the left" if scene.orientation == "radiological"
                else "neurological: patient's right on the right")
        figure.text(1.0 - _SIDE / width, 0.03 / height, note, color=_LABEL_COLOR, fontsize=6,
                    ha="right", va="bottom")
    if scene.overlays:
        from matplotlib.lines import Line2D

        names = [name for name in ("prior", "refined", "truth") if name in scene.overlays]
        handles = [Line2D([0], [0], color=OVERLAY_COLORS[name], linewidth=_OVERLAY_STYLES[name][0],
                          linestyle=_OVERLAY_STYLES[name][1]) for name in names]
        legend = [_OVERLAY_LABELS[name] for name in names]
        figure.legend(handles, legend, loc="lower center", ncol=len(handles), frameon=False,
                      fontsize=8, labelcolor="white", bbox_to_anchor=(0.5, 0.0),
                      handlelength=1.6, columnspacing=1.2)


def _draw(
    scene: _Scene, chosen: list[int], grey: tuple[float, float], title: str | None
) -> Any:
    """Lay out one panel per chosen slice with its captions; return the Agg canvas."""
    extent = panel_extent(scene.data.shape, scene.spacing, scene.axis)
    panel_w, panel_h = _panel_inches(extent[1], extent[3])
    top = 0.42 if title else 0.08
    bottom = 0.36 if scene.overlays else (0.24 if scene.labels else 0.08)
    width = _SIDE * 2 + len(chosen) * panel_w + (len(chosen) - 1) * _GAP
    height = top + panel_h + bottom
    figure, canvas = _agg_figure(width, height)
    for column, index in enumerate(chosen):
        left = _SIDE + column * (panel_w + _GAP)
        ax = figure.add_axes((left / width, bottom / height, panel_w / width, panel_h / height))
        _draw_panel(ax, scene, index, extent, grey)
    _draw_captions(figure, scene, title, (width, height), top)
    return canvas


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
        labelled (see :mod:`cgc_refine.report`).
    orientation : {"neurological", "radiological", "voxel"}
        With an affine: the patient's right on the right (neurological, default) or on the
        left (radiological) of axial and coronal panels; ``"voxel"`` ignores the affine.

    Returns
    -------
    pathlib.Path
        The PNG file, as a :class:`~pathlib.Path`.

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
    require_matplotlib("render_montage")
    out = Path(os.fspath(path))
    scene = _scene(
        image,
        {"prior": prior, "refined": refined, "truth": truth},
        spacing=spacing,
        affine=affine,
        axis=axis,
        orientation=orientation,
    )
    chosen = _chosen_slices(scene, slices, n_slices)
    check_writable_target(out, overwrite)
    canvas = _draw(scene, chosen, _window(scene.data, window), title)

    def write(handle: Any) -> None:
        canvas.print_png(handle)

    atomic_write(out, write, overwrite=overwrite, binary=True)
    logger.info("wrote montage of slices %s (axis %d, %s) to %s",
                [scene.as_displayed(i) for i in chosen], scene.axis,
                orientation if scene.labels is not None else "voxel order", out)
    return out
