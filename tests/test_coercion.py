"""Input coercion (cgc_refine.io.coercion): every accepted form of an image and a brain mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cgc_refine.exceptions import InvalidImageError, SpaceMismatchError
from cgc_refine.io import Volume, as_brain_mask, as_volume, save_array


def test_every_image_form_becomes_a_volume(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    volume = as_volume((data, affine))
    assert volume.shape == (6, 5, 4) and np.allclose(volume.affine, affine)
    assert as_volume(volume) is volume
    assert as_volume(data).n_channels == 1
    path = save_array(data, volume, tmp_path / "a.nii.gz", np.float32)
    assert np.allclose(as_volume(path).data[0], data)
    assert as_volume([path, str(path)]).n_channels == 2
    with pytest.raises(InvalidImageError, match="cannot read a volume from int"):
        as_volume(3)


def test_brain_masks_from_arrays_and_files(tmp_path: Path) -> None:
    volume = Volume.from_array(np.zeros((4, 4, 4), np.float32))
    assert as_brain_mask(None, volume) is None
    soft = np.full((4, 4, 4), 0.7)
    assert as_brain_mask(soft, volume).dtype == bool and as_brain_mask(soft, volume).all()
    boolean = np.eye(4, dtype=bool)[:, :, None].repeat(4, axis=2)
    assert as_brain_mask(boolean, volume) is not None and (as_brain_mask(boolean, volume) == boolean).all()
    path = save_array(boolean.astype(np.uint8), volume, tmp_path / "m.nii.gz", np.uint8)
    assert (as_brain_mask(path, volume) == boolean).all()
    with pytest.raises(SpaceMismatchError, match="brain mask shape"):
        as_brain_mask(np.ones((3, 3, 3), bool), volume)
