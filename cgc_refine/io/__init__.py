"""NIfTI input and output that never breaks geometry.

Images are read into a :class:`Volume`: a float32 array shaped ``(C, X, Y, Z)`` (one channel
per modality) together with the affine, a copy of the first file's header and the voxel
spacing. Every reader checks what it reads and raises an error from
:mod:`cgc_refine.exceptions` whose message names the file and says what to do. Writers keep
the geometry of a reference image and write atomically.

The package holds one concept per module; every public name is importable from
:mod:`cgc_refine.io` itself:

- :mod:`~cgc_refine.io.volume`: the :class:`Volume` class;
- :mod:`~cgc_refine.io.reading`: :func:`load_volume`, :func:`load_array`,
  :func:`load_mask` and the checks on inputs (:func:`check_input_file`,
  :func:`check_same_grid`, :func:`same_file_or_content`);
- :mod:`~cgc_refine.io.writing`: atomic writers (:func:`save_array`, :func:`save_mask`,
  :func:`save_probability_map`) and :func:`check_output_path`;
- :mod:`~cgc_refine.io.orientation`: :func:`to_canonical` and :func:`from_canonical`, which
  move arrays to and from the closest-RAS axis order exactly;
- :mod:`~cgc_refine.io.naming`: :func:`default_output_path`;
- :mod:`~cgc_refine.io.coercion`: turning paths, arrays and volumes given to the estimator
  into volumes and masks.

All modules log to the ``cgc_refine.io`` logger.
"""

from __future__ import annotations

from ._nifti import PathLike  # noqa: F401 - the path type of the signatures below
from .naming import default_output_path
from .orientation import from_canonical, to_canonical
from .reading import (
    check_input_file,
    check_same_grid,
    load_array,
    load_mask,
    load_volume,
    same_file_or_content,
)
from .volume import Volume
from .writing import check_output_path, save_array, save_mask, save_probability_map

__all__ = [
    "Volume",
    "load_volume",
    "load_array",
    "load_mask",
    "check_same_grid",
    "check_input_file",
    "check_output_path",
    "same_file_or_content",
    "save_array",
    "save_mask",
    "save_probability_map",
    "to_canonical",
    "from_canonical",
    "default_output_path",
]

# Input coercion builds on the modules above, so it is imported last; its public names (its
# ``__all__``) are re-exported here.
from . import coercion as _coercion  # noqa: E402
from .coercion import *  # noqa: E402,F401,F403

__all__ += _coercion.__all__
