"""Where the command line writes: ``-o`` as a file or a folder, or next to the image."""

from __future__ import annotations

from pathlib import Path

from ..exceptions import OutputNotWritableError
from ..workflow.results import is_nifti_name

__all__ = ["resolve_output"]


def resolve_output(image: Path, output: str | None, suffix: str) -> Path:
    """The output NIfTI for ``image``: next to it, the file ``output``, or inside folder ``output``.

    Raises
    ------
    OutputNotWritableError
        When ``output`` is an existing file that is not NIfTI, or a missing folder.
    """
    from ..io import default_output_path

    if output is None:
        return default_output_path(image, suffix)
    out = Path(output)
    if is_nifti_name(out) and not out.is_dir():
        return out
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(
            f"output '{out}' is neither a folder nor a .nii/.nii.gz file name; pass an existing "
            "folder or a file name ending in .nii.gz"
        )
    if not out.is_dir():
        raise OutputNotWritableError(
            f"output folder '{out}' does not exist; create it first (mkdir -p '{out}') or pass "
            "a file name ending in .nii.gz"
        )
    return default_output_path(image, suffix, out_dir=out)
