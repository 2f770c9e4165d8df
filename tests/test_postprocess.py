"""Tests of cgc_refine.postprocess on small hand-made masks."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cgc_refine.exceptions import EmptyMaskError, SpaceMismatchError
from cgc_refine.postprocess import (
    apply_brain_mask,
    largest_components,
    remove_small_components,
    threshold,
)


def blob_mask() -> np.ndarray:
    """A 3-voxel line along z and a separate 2x2x2 cube."""
    m = np.zeros((8, 8, 8), np.uint8)
    m[1, 1, 1:4] = 1  # 3 voxels
    m[5:7, 5:7, 5:7] = 1  # 8 voxels
    return m


# -------------------------------------------------------------------------------- threshold


def test_threshold_values_and_dtype() -> None:
    prob = np.array([0.0, 0.2, 0.49999, 0.5, 0.7, 1.0], dtype=np.float32).reshape(1, 2, 3)
    out = threshold(prob)
    assert out.dtype == np.uint8
    assert out.shape == prob.shape
    assert out.ravel().tolist() == [0, 0, 0, 1, 1, 1]
    assert threshold(prob, level=0.8).ravel().tolist() == [0, 0, 0, 0, 0, 1]
    assert threshold(prob, level=0.1).ravel().tolist() == [0, 1, 1, 1, 1, 1]


def test_threshold_nan_is_background_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    prob = np.array([np.nan, 0.9, 0.1])
    with caplog.at_level(logging.WARNING, logger="cgc_refine.postprocess"):
        out = threshold(prob)
    assert out.tolist() == [0, 1, 0]
    assert "NaN" in caplog.text


@pytest.mark.parametrize("level", [0.0, 1.0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_threshold_rejects_bad_level(level) -> None:
    with pytest.raises(ValueError, match="level"):
        threshold(np.zeros((2, 2, 2)), level=level)


# ---------------------------------------------------------------- remove_small_components


def test_small_component_volume_uses_anisotropic_spacing() -> None:
    m = np.zeros((5, 5, 5), np.uint8)
    m[2, 2, 1:4] = 1  # 3 voxels of 1 x 1 x 2 mm = 6 mm³
    assert remove_small_components(m, 7.0, (1, 1, 2)).sum() == 0
    kept = remove_small_components(m, 6.0, (1, 1, 2))
    assert np.array_equal(kept, m)
    # The same voxels at isotropic 1 mm are only 3 mm³ and go at 6 mm³.
    assert remove_small_components(m, 6.0, (1, 1, 1)).sum() == 0
    assert remove_small_components(m, 3.0, (1.0, 1.0, 1.0)).sum() == 3


def test_small_components_removed_large_kept() -> None:
    m = blob_mask()
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm³ per voxel: line 1.5 mm³, cube 4 mm³
    out = remove_small_components(m, 2.0, spacing)
    assert out.dtype == np.uint8
    assert out.sum() == 8
    assert out[5:7, 5:7, 5:7].all()
    assert out[1, 1].sum() == 0
    assert remove_small_components(m, 4.0, spacing).sum() == 8
    assert remove_small_components(m, 4.01, spacing).sum() == 0


def test_threshold_volume_with_inexact_spacing_is_kept() -> None:
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0:3] = 1
    # 3 * (0.1 * 0.1 * 0.1) is not exactly 0.003 in floating point.
    assert remove_small_components(m, 0.003, (0.1, 0.1, 0.1)).sum() == 3


def test_min_size_zero_keeps_everything_and_input_is_untouched() -> None:
    m = blob_mask()
    before = m.copy()
    out = remove_small_components(m, 0, (1, 1, 1))
    assert np.array_equal(out, m)
    assert out is not m
    remove_small_components(m, 100.0, (1, 1, 1))
    assert np.array_equal(m, before)


def test_non_binary_and_boolean_masks() -> None:
    m = blob_mask().astype(np.int16) * 7
    out = remove_small_components(m, 5.0, (1, 1, 1))
    assert out.dtype == np.uint8
    assert set(np.unique(out).tolist()) == {0, 1}
    assert out.sum() == 8
    assert remove_small_components(m.astype(bool), 5.0, (1, 1, 1)).sum() == 8


def test_connectivity_edge_neighbours() -> None:
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0] = m[1, 1, 0] = 1  # share an edge, not a face
    spacing = (1, 1, 2)  # 2 mm³ per voxel; together 4 mm³
    assert remove_small_components(m, 3.0, spacing, connectivity=6).sum() == 0
    assert remove_small_components(m, 3.0, spacing, connectivity=18).sum() == 2
    assert remove_small_components(m, 3.0, spacing, connectivity=26).sum() == 2


def test_connectivity_corner_neighbours() -> None:
    m = np.zeros((4, 4, 4), np.uint8)
    m[0, 0, 0] = m[1, 1, 1] = 1  # share only a corner
    assert remove_small_components(m, 2.0, (1, 1, 1), connectivity=6).sum() == 0
    assert remove_small_components(m, 2.0, (1, 1, 1), connectivity=18).sum() == 0
    assert remove_small_components(m, 2.0, (1, 1, 1)).sum() == 2  # 26 by default


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((np.zeros((3, 3)), 1.0, (1, 1, 1)), {}, "3-D"),
        ((np.zeros((3, 3, 3)), -1.0, (1, 1, 1)), {}, "min_size_mm3"),
        ((np.zeros((3, 3, 3)), float("inf"), (1, 1, 1)), {}, "min_size_mm3"),
        ((np.zeros((3, 3, 3)), 1.0, (1, 1)), {}, "spacing"),
        ((np.zeros((3, 3, 3)), 1.0, (1, 0, 1)), {}, "spacing"),
        ((np.zeros((3, 3, 3)), 1.0, (1, -1, 1)), {}, "spacing"),
        ((np.zeros((3, 3, 3)), 0.0, (1, 1, 1)), {"connectivity": 4}, "connectivity"),
        ((np.zeros((3, 3, 3)), 1.0, (1, 1, 1)), {"connectivity": 8}, "connectivity"),
    ],
)
def test_remove_small_components_rejects_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        remove_small_components(*args, **kwargs)


# --------------------------------------------------------------------- largest_components


def three_blobs() -> np.ndarray:
    m = np.zeros((10, 10, 10), np.uint8)
    m[0, 0, 0:5] = 1  # 5 voxels
    m[5, 5, 0:3] = 1  # 3 voxels
    m[9, 9, 9] = 1  # 1 voxel
    return m


@pytest.mark.parametrize(("n", "expected"), [(1, 5), (2, 8), (3, 9), (10, 9)])
def test_largest_components(n: int, expected: int) -> None:
    out = largest_components(three_blobs(), n)
    assert out.dtype == np.uint8
    assert out.sum() == expected
    assert out[0, 0, 0:5].all()


def test_largest_components_connectivity_and_empty() -> None:
    m = np.zeros((5, 5, 5), np.uint8)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = 1  # a diagonal chain
    m[4, 4, 2:4] = 1  # 2 face-connected voxels
    assert largest_components(m, 1, connectivity=26).sum() == 3
    assert largest_components(m, 1, connectivity=6).sum() == 2
    assert largest_components(np.zeros((3, 3, 3)), 2).sum() == 0


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_largest_components_rejects_bad_n(n) -> None:
    with pytest.raises(ValueError, match="n must"):
        largest_components(three_blobs(), n)


# ------------------------------------------------------------------------ apply_brain_mask


def test_apply_brain_mask_on_probabilities_and_masks() -> None:
    rng = np.random.default_rng(0)
    prob = rng.random((4, 5, 6), dtype=np.float32)
    brain = np.zeros((4, 5, 6), np.uint8)
    brain[1:3, 1:4, 2:5] = 1
    before = prob.copy()
    out = apply_brain_mask(prob, brain)
    assert out.dtype == np.float32
    assert np.array_equal(out[brain == 1], prob[brain == 1])
    assert np.all(out[brain == 0] == 0)
    assert np.array_equal(prob, before)  # the input is not modified

    mask = np.ones((4, 5, 6), np.uint8)
    out_mask = apply_brain_mask(mask, brain.astype(bool))
    assert out_mask.dtype == np.uint8
    assert np.array_equal(out_mask, brain)


def test_apply_brain_mask_errors() -> None:
    with pytest.raises(SpaceMismatchError, match="shape"):
        apply_brain_mask(np.ones((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(EmptyMaskError, match="no voxel"):
        apply_brain_mask(np.ones((4, 4, 4)), np.zeros((4, 4, 4)))
