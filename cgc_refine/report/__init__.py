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

The package holds :mod:`~cgc_refine.report.slices` (slice choice and panel geometry, no
matplotlib), :mod:`~cgc_refine.report.montage` (the PNG) and :mod:`~cgc_refine.report.page`
(the HTML page); every public name is importable from :mod:`cgc_refine.report`.
"""

from __future__ import annotations

from ..exceptions import MissingDependencyError
from .montage import OVERLAY_COLORS, render_montage, require_matplotlib
from .page import write_html_report
from .slices import ORIENTATIONS, lesion_slices, panel_extent, side_labels

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
