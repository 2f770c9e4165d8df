"""The :class:`Volume`: one subject's image, channels of 3-D data on a single voxel grid."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..exceptions import InvalidImageError
from ._nifti import (
    _affine_spacing,
    _as_nifti_header,
    _count_non_finite,
    _default_header,
    _header_spacing,
    _set_geometry,
    _unit_factor,
    _validate_affine,
)

__all__ = ["Volume"]


@dataclass(frozen=True, eq=False, repr=False)
class Volume:
    """One subject's image: channels of 3-D data on a single voxel grid.

    Parameters
    ----------
    data : numpy.ndarray
        Float32 array shaped ``(C, X, Y, Z)``: one channel per modality (C = 1 for a single
        file). Other float or integer arrays are cast to float32; values must be finite.
    affine : numpy.ndarray
        The (4, 4) float64 voxel-to-world matrix (RAS+ world, millimetres).
    header : nibabel.Nifti1Header
        A copy of the first source file's header (a ``Nifti2Header`` for NIfTI-2 files), kept
        so that outputs inherit its fields. Its data dtype is that of the source file.
    spacing : tuple of float
        Voxel sizes in millimetres along the three array axes (from the header zooms).
    paths : tuple of pathlib.Path
        The source files, one per channel; empty for in-memory volumes.

    Raises
    ------
    InvalidImageError
        If ``data`` is not 4-D numeric, holds NaN/Inf, or the affine or spacing is invalid.

    Notes
    -----
    The dataclass is frozen but numpy arrays stay mutable; build a modified volume with
    :func:`dataclasses.replace` (which validates again) rather than editing ``data`` in
    place. Equality is identity.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    spacing: tuple[float, float, float]
    paths: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        data = np.asarray(self.data)
        if data.dtype.fields is not None or data.dtype.kind not in "biuf":
            raise InvalidImageError(
                f"volume data must be real numbers, got dtype {data.dtype}; "
                "convert the array to float32"
            )
        if data.ndim != 4:
            raise InvalidImageError(
                f"Volume data must be 4-D (C, X, Y, Z), got shape {data.shape}; "
                "use Volume.from_array for a 3-D array"
            )
        if min(data.shape) < 1:
            raise InvalidImageError(
                f"volume data has an empty axis (shape {data.shape}); pass a non-empty array"
            )
        data = np.ascontiguousarray(data, dtype=np.float32)
        n_nan, n_inf = _count_non_finite(data)
        if n_nan or n_inf:
            raise InvalidImageError(
                f"volume data contain {n_nan} NaN and {n_inf} infinite values; replace them "
                "(e.g. numpy.nan_to_num) before building a Volume"
            )
        affine = _validate_affine(self.affine, InvalidImageError, "volume")
        spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=np.float64).ravel())
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise InvalidImageError(
                f"spacing must be three positive finite voxel sizes in mm, got {self.spacing!r}"
            )
        header = self.header
        if not isinstance(header, nib.Nifti1Header):
            header = _as_nifti_header(header)
        paths = tuple(Path(os.fsdecode(p)) for p in self.paths)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "paths", paths)

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, n_channels={self.n_channels}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, "
            f"axcodes={''.join(self.axcodes)}, paths={[str(p) for p in self.paths]})"
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return (int(self.data.shape[1]), int(self.data.shape[2]), int(self.data.shape[3]))

    @property
    def n_channels(self) -> int:
        """Number of channels (modalities)."""
        return int(self.data.shape[0])

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """World direction of each array axis, e.g. ``('L', 'A', 'S')``."""
        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]

    @classmethod
    def from_array(
        cls,
        data: np.ndarray,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
        header: object | None = None,
    ) -> Volume:
        """Build a volume from an in-memory array.

        Parameters
        ----------
        data : numpy.ndarray
            A 3-D array ``(X, Y, Z)`` (becomes one channel) or a 4-D channel-first array
            ``(C, X, Y, Z)``. It is copied and cast to float32; values must be finite.
        affine : numpy.ndarray, optional
            The (4, 4) voxel-to-world matrix. When None: the header's affine if a header is
            given, else ``diag(spacing or (1, 1, 1))``.
        spacing : sequence of float, optional
            Voxel sizes in mm. When None: the header zooms if a header is given, else the
            voxel sizes of the affine (1 mm when both are None).
        header : nibabel header, optional
            A header to inherit fields from (copied; its shape, and its qform/sform when they
            disagree with ``affine``, are updated). A fresh float32 header when None.

        Returns
        -------
        Volume
            The new volume, with no source paths.

        Raises
        ------
        InvalidImageError
            If ``data`` is neither 3-D nor 4-D, holds NaN/Inf, or the geometry is invalid.
        """
        arr = np.array(data, copy=True)
        if arr.ndim == 3:
            arr = arr[np.newaxis]
        elif arr.ndim != 4:
            raise InvalidImageError(
                f"Volume.from_array needs a 3-D (X, Y, Z) or 4-D (C, X, Y, Z) array, got shape "
                f"{arr.shape}; reshape the data to channel-first order"
            )
        shape = (int(arr.shape[1]), int(arr.shape[2]), int(arr.shape[3]))
        hdr = None if header is None else _as_nifti_header(header)
        if spacing is not None:
            spacing_t = tuple(float(s) for s in spacing)
            if len(spacing_t) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
                raise InvalidImageError(
                    f"spacing must be three positive finite voxel sizes in mm, got {spacing!r}"
                )
        else:
            spacing_t = None
        if affine is None:
            if hdr is not None:
                affine_arr = hdr.get_best_affine()
            else:
                affine_arr = np.diag([*(spacing_t or (1.0, 1.0, 1.0)), 1.0])
        else:
            affine_arr = affine
        affine_arr = _validate_affine(affine_arr, InvalidImageError, "volume")
        if spacing_t is None:
            if hdr is not None:
                spacing_t = _header_spacing(hdr, affine_arr)
            else:
                spacing_t = _affine_spacing(affine_arr)
        if hdr is None:
            hdr = _default_header(shape, affine_arr, spacing_t)
        else:
            hdr.set_data_shape(shape)
            _set_geometry(hdr, affine_arr)
            hdr.set_zooms(tuple(s / _unit_factor(hdr) for s in spacing_t))
        return cls(data=arr, affine=affine_arr, header=hdr, spacing=spacing_t, paths=())
