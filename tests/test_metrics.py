"""Tests of cgc_refine.metrics against values counted by hand.

Every expected value below is derived in the comment next to it from voxel counts and
distances one can check on paper; sklearn is used only as an independent reference for AUPRC.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from cgc_refine.exceptions import (
    CGCRefineError,
    EmptyMaskError,
    InvalidImageError,
    SpaceMismatchError,
)
from cgc_refine.metrics import (
    __all__ as metrics_all,
    assd,
    auprc,
    dice,
    evaluate,
    hd95,
    precision,
    sensitivity,
)
from cgc_refine.metrics import _surface_distances


# --------------------------------------------------------------------------------------------
# fixtures built by hand
# --------------------------------------------------------------------------------------------


def counted_pair() -> tuple[np.ndarray, np.ndarray]:
    """Shape (2, 3, 4): truth 6 voxels, pred 5 voxels, 3 shared.

    truth: (0,0,0) (0,0,1) (0,0,2) (0,1,0) (0,1,1) (0,1,2)
    pred:  (0,0,2) (0,1,1) (0,1,2) (0,1,3) (1,2,0)
    TP = {(0,0,2), (0,1,1), (0,1,2)} = 3
    FP = {(0,1,3), (1,2,0)} = 2
    FN = {(0,0,0), (0,0,1), (0,1,0)} = 3
    """
    truth = np.zeros((2, 3, 4), dtype=bool)
    truth[0, 0:2, 0:3] = True
    pred = np.zeros((2, 3, 4), dtype=bool)
    pred[0, 0, 2] = True
    pred[0, 1, 1:4] = True
    pred[1, 2, 0] = True
    return pred, truth


def cube(shape: tuple[int, int, int], corner: tuple[int, int, int], size: int = 3) -> np.ndarray:
    """Boolean array of ``shape`` with a ``size``-cube whose lowest corner is ``corner``."""
    out = np.zeros(shape, dtype=bool)
    x, y, z = corner
    out[x : x + size, y : y + size, z : z + size] = True
    return out


# --------------------------------------------------------------------------------------------
# overlap metrics
# --------------------------------------------------------------------------------------------


def test_overlap_metrics_on_counted_voxels() -> None:
    pred, truth = counted_pair()
    # TP=3, FP=2, FN=3: dice = 2*3 / (2*3 + 2 + 3) = 6/11
    assert dice(pred, truth) == pytest.approx(6 / 11, abs=1e-15)
    # sensitivity = TP / (TP + FN) = 3/6
    assert sensitivity(pred, truth) == pytest.approx(0.5, abs=1e-15)
    # precision = TP / (TP + FP) = 3/5
    assert precision(pred, truth) == pytest.approx(0.6, abs=1e-15)


def test_overlap_metrics_are_not_symmetric_in_the_right_way() -> None:
    pred, truth = counted_pair()
    # swapping roles swaps FP and FN: sensitivity 3/5, precision 3/6, dice unchanged 6/11
    assert sensitivity(truth, pred) == pytest.approx(0.6, abs=1e-15)
    assert precision(truth, pred) == pytest.approx(0.5, abs=1e-15)
    assert dice(truth, pred) == pytest.approx(6 / 11, abs=1e-15)


def test_values_above_zero_are_foreground_for_any_dtype() -> None:
    pred, truth = counted_pair()
    # the same masks written as a label map (2 = lesion, -1 = background) and as floats
    truth_labels = np.where(truth, 2, -1).astype(np.int16)
    pred_float = np.where(pred, 0.3, -0.7)
    assert dice(pred_float, truth_labels) == pytest.approx(6 / 11, abs=1e-15)
    assert sensitivity(pred_float, truth_labels) == pytest.approx(0.5, abs=1e-15)
    assert precision(pred_float, truth_labels) == pytest.approx(0.6, abs=1e-15)
    # nested lists work as array-likes: TP=1 ((0,1)), FP=1 ((0,0)), FN=1 ((1,1)) -> dice 2/4
    assert dice([[1, 1], [0, 0]], [[0, 1], [0, 1]]) == pytest.approx(0.5, abs=1e-15)


def test_perfect_and_disjoint_overlap() -> None:
    a = cube((5, 5, 5), (0, 0, 0), 2)
    b = cube((5, 5, 5), (3, 3, 3), 2)
    assert dice(a, a) == 1.0 and sensitivity(a, a) == 1.0 and precision(a, a) == 1.0
    # no shared voxel: TP = 0 -> all three are 0
    assert dice(a, b) == 0.0 and sensitivity(a, b) == 0.0 and precision(a, b) == 0.0


def test_overlap_empty_mask_policy() -> None:
    empty = np.zeros((3, 3, 3), dtype=bool)
    full = np.ones((3, 3, 3), dtype=bool)
    # both empty: dice 1.0 (agreement), sensitivity nan (truth empty), precision nan (pred empty)
    assert dice(empty, empty) == 1.0
    assert math.isnan(sensitivity(empty, empty))
    assert math.isnan(precision(empty, empty))
    # pred empty, truth not: dice 0, sensitivity 0/27 = 0, precision undefined
    assert dice(empty, full) == 0.0
    assert sensitivity(empty, full) == 0.0
    assert math.isnan(precision(empty, full))
    # truth empty, pred not: dice 0, sensitivity undefined, precision 0/27 = 0
    assert dice(full, empty) == 0.0
    assert math.isnan(sensitivity(full, empty))
    assert precision(full, empty) == 0.0


# --------------------------------------------------------------------------------------------
# surface distances: hand-computed cases
# --------------------------------------------------------------------------------------------


def test_cubes_offset_by_two_along_a_unit_axis() -> None:
    # 3x3x3 cubes, B shifted by k=2 along axis 0 (spacing 1). Surfaces: all 26 voxels but the
    # centre. Local x: A in {0,1,2}, B in {2,3,4}.
    # A -> B: the 8 outer (y,z) columns give x=0:2, x=1:1, x=2:0; the centre column has only
    # x=0 (2, to B's (2,1,1)) and x=2 (0). So 9 twos, 8 ones, 9 zeros; B -> A is the mirror image.
    # ASSD = (2*(9*2 + 8*1)) / 52 = 52/52 = 1. HD95: sorted 26 values, 95% at index
    # 0.95*25 = 23.75, between indices 23 and 24, both twos -> 2.
    a = cube((9, 7, 7), (2, 2, 2))
    b = cube((9, 7, 7), (4, 2, 2))
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(2.0, abs=1e-12)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(1.0, abs=1e-12)


def test_cubes_offset_by_two_along_the_thick_axis() -> None:
    # Same cubes shifted by k=2 along axis 2 whose spacing is 2 mm: every distance above doubles
    # (the centre column's z=0 voxel is 2*2 = 4 from B's (1,1,2); the lateral route
    # sqrt(1 + 16) is longer). ASSD = 2, HD95 = 4.
    a = cube((7, 7, 9), (2, 2, 2))
    b = cube((7, 7, 9), (2, 2, 4))
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(4.0, abs=1e-12)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(2.0, abs=1e-12)


def test_cubes_offset_by_one_along_a_unit_axis() -> None:
    # B shifted by k=1 along axis 0 (spacing 1). Local x: A in {0,1,2}, B in {1,2,3}.
    # A -> B, outer columns: x=0 -> 1, x=1 -> 0, x=2 -> 0 (8 ones, 16 zeros).
    # Centre column: A has x=0 and x=2; B's voxel (2,1,1) is B's centre, not surface, so
    # x=2 is 1 from (1,1,1), (3,1,1) or (2,0,1); x=0 is 1 from (1,1,1). -> 10 ones, 16 zeros.
    # B -> A mirrors it. ASSD = 20/52 = 5/13; HD95: index 23.75 of [0]*16 + [1]*10 -> 1.
    a = cube((8, 7, 7), (2, 2, 2))
    b = cube((8, 7, 7), (3, 2, 2))
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(1.0, abs=1e-12)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(5 / 13, abs=1e-12)


def test_cubes_offset_by_one_along_the_thick_axis() -> None:
    # B shifted by k=1 along axis 2 (spacing 2). Local z: A in {0,1,2}, B in {1,2,3}.
    # A -> B, outer (x,y) columns: z=0 -> 2 mm, z=1 -> 0, z=2 -> 0 (8 twos, 16 zeros).
    # Centre column: z=0 -> 2 mm to (1,1,1); z=2 -> B's (1,1,2) is B's centre, but
    # (0,1,2) lies on B's side face 1 mm away along axis 0 -> 1.
    # -> 9 twos, 1 one, 16 zeros (sum 19); B -> A mirrors it.
    # ASSD = 38/52 = 19/26. HD95: index 23.75 of [0]*16 + [1] + [2]*9 -> 2.
    a = cube((7, 7, 8), (2, 2, 2))
    b = cube((7, 7, 8), (2, 2, 3))
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(2.0, abs=1e-12)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(19 / 26, abs=1e-12)
    # isotropic: the centre voxel z=2 is 1 mm from every candidate, outer columns give ones:
    # 10 ones, 16 zeros per direction -> ASSD = 20/52 = 5/13, HD95 = 1.
    assert hd95(a, b) == pytest.approx(1.0, abs=1e-12)
    assert assd(a, b) == pytest.approx(5 / 13, abs=1e-12)


def test_percentile_interpolates_linearly_between_directed_distances() -> None:
    # A: one voxel at z=0; B: a line of 5 voxels at z = 0..4 along axis 2 (spacing 2 mm).
    # Every voxel is surface. A -> B: [0]. B -> A: [0, 2, 4, 6, 8] mm.
    # 95th percentile of B -> A: position 0.95*4 = 3.8 -> 6 + 0.8*(8 - 6) = 7.6;
    # HD95 = max(0, 7.6) = 7.6. ASSD = (0 + 0+2+4+6+8) / (1 + 5) = 20/6 = 10/3.
    a = np.zeros((3, 3, 7), dtype=bool)
    a[1, 1, 1] = True
    b = np.zeros((3, 3, 7), dtype=bool)
    b[1, 1, 1:6] = True
    assert hd95(a, b, (1, 1, 2)) == pytest.approx(7.6, abs=1e-12)
    assert assd(a, b, (1, 1, 2)) == pytest.approx(10 / 3, abs=1e-12)
    assert hd95(b, a, (1, 1, 2)) == pytest.approx(7.6, abs=1e-12)  # symmetric
    # isotropic: B -> A = [0,1,2,3,4]: 3 + 0.8*1 = 3.8; ASSD = 10/6
    assert hd95(a, b) == pytest.approx(3.8, abs=1e-12)
    assert assd(a, b) == pytest.approx(10 / 6, abs=1e-12)


def test_anisotropy_changes_which_voxel_is_nearest() -> None:
    # A: voxel p=(1,1,1). B: q1=(4,1,1) (3 voxels away along axis 0) and q2=(1,1,2) (1 along
    # axis 2).
    # Isotropic: A -> B = [1] (q2); B -> A = [3, 1]. percentile([1, 3], 95) = 1 + 0.95*2 = 2.9;
    # HD95 = 2.9, ASSD = (1 + 3 + 1)/3 = 5/3.
    # Spacing (1,1,8): q1 is 3 mm, q2 is 8 mm away: A -> B = [3]; B -> A = [3, 8];
    # percentile([3, 8], 95) = 3 + 0.95*5 = 7.75; HD95 = 7.75; ASSD = (3 + 3 + 8)/3 = 14/3.
    a = np.zeros((6, 3, 4), dtype=bool)
    a[1, 1, 1] = True
    b = np.zeros((6, 3, 4), dtype=bool)
    b[4, 1, 1] = True
    b[1, 1, 2] = True
    assert hd95(a, b) == pytest.approx(2.9, abs=1e-12)
    assert assd(a, b) == pytest.approx(5 / 3, abs=1e-12)
    assert hd95(a, b, (1, 1, 8)) == pytest.approx(7.75, abs=1e-12)
    assert assd(a, b, (1, 1, 8)) == pytest.approx(14 / 3, abs=1e-12)


def test_clinical_anisotropic_spacing() -> None:
    # Single voxels 3 and 4 voxels apart in-plane (0.47 mm) and 1 slice apart (8 mm):
    # in-plane 0.47*sqrt(3^2 + 4^2) = 0.47*5 = 2.35 mm; distance sqrt(2.35^2 + 8^2)
    # = sqrt(5.5225 + 64) = sqrt(69.5225) mm, both directions, so HD95 = ASSD = that.
    a = np.zeros((12, 12, 5), dtype=bool)
    b = np.zeros((12, 12, 5), dtype=bool)
    a[5, 5, 2] = True
    b[8, 9, 3] = True
    expected = math.sqrt(69.5225)
    spacing = (0.47, 0.47, 8.0)
    assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-12)
    assert assd(a, b, spacing) == pytest.approx(expected, abs=1e-12)
    # with (1,1,1) it would be sqrt(9 + 16 + 1) = sqrt(26)
    assert hd95(a, b) == pytest.approx(math.sqrt(26), abs=1e-12)


def test_surface_excludes_interior_and_array_border_is_background() -> None:
    # pred fills the whole 3x3x3 array; as outside the array is background, its surface is the
    # 26 voxels around the centre (the centre has all 6 face-neighbours inside).
    # truth: the centre voxel alone (its own surface).
    # pred -> truth: 6 face voxels at 1, 12 edge voxels at sqrt(2), 8 corners at sqrt(3).
    # truth -> pred: centre to nearest pred-surface voxel = 1 (not 0: the centre is interior).
    # ASSD = (6 + 12*sqrt2 + 8*sqrt3 + 1) / 27.
    # HD95: pred -> truth sorted [1]*6 + [sqrt2]*12 + [sqrt3]*8, index 23.75 -> sqrt3;
    # truth -> pred = [1] -> 1; max = sqrt3.
    pred = np.ones((3, 3, 3), dtype=bool)
    truth = np.zeros((3, 3, 3), dtype=bool)
    truth[1, 1, 1] = True
    assert hd95(pred, truth) == pytest.approx(math.sqrt(3), abs=1e-12)
    expected = (6 + 12 * math.sqrt(2) + 8 * math.sqrt(3) + 1) / 27
    assert assd(pred, truth) == pytest.approx(expected, abs=1e-12)


def test_surface_uses_face_connectivity() -> None:
    # pred: a 3-D plus (centre and its 6 face-neighbours). The centre has all 6 face-neighbours
    # in the mask, so with face connectivity it is interior (with 26-connectivity it would be
    # surface). truth: the centre voxel.
    # pred -> truth: 6 arms at 1 mm; truth -> pred: nearest pred-surface voxel is an arm, 1 mm.
    # ASSD = 7/7 = 1, HD95 = 1. (Were the centre surface: ASSD = 6/8 = 0.75, HD95 ≈ 1.)
    pred = np.zeros((5, 5, 5), dtype=bool)
    pred[1:4, 2, 2] = pred[2, 1:4, 2] = pred[2, 2, 1:4] = True
    truth = np.zeros((5, 5, 5), dtype=bool)
    truth[2, 2, 2] = True
    assert assd(pred, truth) == pytest.approx(1.0, abs=1e-12)
    assert hd95(pred, truth) == pytest.approx(1.0, abs=1e-12)


def test_identical_masks_are_at_distance_zero() -> None:
    a = cube((6, 6, 6), (1, 1, 1))
    assert hd95(a, a, (0.5, 0.5, 3.0)) == 0.0
    assert assd(a, a, (0.5, 0.5, 3.0)) == 0.0


def test_distance_empty_mask_policy() -> None:
    empty = np.zeros((4, 4, 4), dtype=bool)
    a = cube((4, 4, 4), (0, 0, 0), 2)
    assert hd95(empty, empty) == 0.0
    assert assd(empty, empty) == 0.0
    for pred, truth in ((a, empty), (empty, a)):
        assert hd95(pred, truth) == math.inf
        assert assd(pred, truth) == math.inf


# --------------------------------------------------------------------------------------------
# cropping does not change anything
# --------------------------------------------------------------------------------------------


def random_blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Irregular blobs: thresholded smoothed noise, some touching the array border."""
    from scipy import ndimage

    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    return noise > 0.12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_gives_identical_distances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (30, 26, 12)
    pred = random_blobs(rng, shape)
    truth = random_blobs(rng, shape)
    assert pred.any() and truth.any()
    spacing = (0.47, 0.47, 8.0)
    full = _surface_distances(pred, truth, spacing, crop=False)
    cropped = _surface_distances(pred, truth, spacing, crop=True)
    for d_full, d_crop in zip(full, cropped):
        assert d_full.size > 0
        np.testing.assert_array_equal(d_crop, d_full)


def test_crop_with_small_objects_far_from_border() -> None:
    # The same pair embedded in a large volume gives the very same numbers as in a tight one,
    # and the cropped computation matches the uncropped one (values as in the k=1 cube test).
    small_a = cube((5, 3, 3), (0, 0, 0))
    small_b = cube((5, 3, 3), (1, 0, 0))  # tight: both cubes touch the array border
    big_a = np.zeros((60, 50, 20), dtype=bool)
    big_b = np.zeros((60, 50, 20), dtype=bool)
    big_a[30:35, 20:23, 10:13] = small_a
    big_b[30:35, 20:23, 10:13] = small_b
    spacing = (1.0, 1.0, 2.0)
    assert assd(small_a, small_b, spacing) == pytest.approx(5 / 13, abs=1e-12)
    assert assd(big_a, big_b, spacing) == assd(small_a, small_b, spacing)
    assert hd95(big_a, big_b, spacing) == hd95(small_a, small_b, spacing) == 1.0
    full = _surface_distances(big_a, big_b, spacing, crop=False)
    cropped = _surface_distances(big_a, big_b, spacing, crop=True)
    for d_full, d_crop in zip(full, cropped):
        np.testing.assert_array_equal(d_crop, d_full)


# --------------------------------------------------------------------------------------------
# AUPRC
# --------------------------------------------------------------------------------------------


def test_auprc_by_hand() -> None:
    # scores 0.9 0.8 0.7 0.6 with truth 1 0 1 0:
    # >=0.9: P=1/1, R=1/2; >=0.8: P=1/2, R=1/2; >=0.7: P=2/3, R=1; >=0.6: P=2/4, R=1.
    # AP = (1/2)*1 + 0*(1/2) + (1/2)*(2/3) + 0 = 1/2 + 1/3 = 5/6
    assert auprc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6, abs=1e-15)
    # perfect ranking -> 1
    assert auprc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == pytest.approx(1.0, abs=1e-15)


def test_auprc_groups_tied_scores() -> None:
    # scores 0.9 0.7 0.7 0.1 with truth 0 1 1 0: the tied pair enters together.
    # >=0.9: TP=0, FP=1, R=0 (no recall step); >=0.7: TP=2, FP=1, P=2/3, R=1; >=0.1: R stays 1.
    # AP = 1 * 2/3 = 2/3 (ranking the tie positive-first would wrongly give 1/2 + 1/2*2/3 = 5/6)
    assert auprc([0.9, 0.7, 0.7, 0.1], [0, 1, 1, 0]) == pytest.approx(2 / 3, abs=1e-15)
    # all scores equal: one threshold, P = prevalence = 2/10, R = 1 -> AP = 0.2
    truth = [1, 0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert auprc(np.full(10, 0.5), truth) == pytest.approx(0.2, abs=1e-15)


def test_auprc_mask_restricts_voxels() -> None:
    # A fifth voxel: a negative with the top score 0.95.
    # Without mask, order 0.95(-) 0.9(+) 0.8(-) 0.7(+) 0.6(-):
    # >=0.9: P=1/2, R=1/2; >=0.7: P=2/4, R=1 -> AP = 1/2*1/2 + 1/2*1/2 = 1/2.
    # Masking it out leaves the 5/6 case above.
    prob = np.array([0.9, 0.8, 0.7, 0.6, 0.95])
    truth = np.array([1, 0, 1, 0, 0])
    mask = np.array([1, 1, 1, 1, 0], dtype=bool)
    assert auprc(prob, truth) == pytest.approx(0.5, abs=1e-15)
    assert auprc(prob, truth, mask=mask) == pytest.approx(5 / 6, abs=1e-15)
    # a truth voxel outside the mask is ignored: with voxel 5 positive the unmasked AP becomes
    # >=0.95: P=1, R=1/3; >=0.9: P=1, R=2/3; >=0.7: P=3/4, R=1 -> 1/3 + 1/3 + 1/4 = 11/12,
    # while the masked value stays 5/6.
    truth_out = np.array([1, 0, 1, 0, 1])
    assert auprc(prob, truth_out) == pytest.approx(11 / 12, abs=1e-15)
    assert auprc(prob, truth_out, mask=mask) == pytest.approx(5 / 6, abs=1e-15)


def test_auprc_on_3d_volume_by_hand() -> None:
    # (2,2,2) volume: values 0.1..0.8, positives at the 0.8 and 0.5 voxels.
    # descending 0.8(+) 0.7 0.6 0.5(+): P at 0.8 = 1, R=1/2; P at 0.5 = 2/4, R=1 -> AP = 3/4
    prob = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2) / 10
    truth = np.zeros((2, 2, 2), dtype=np.uint8)
    truth[1, 1, 1] = 1  # 0.8
    truth[1, 0, 0] = 1  # 0.5
    assert auprc(prob, truth) == pytest.approx(0.75, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_levels", [3, 50, 0])
def test_auprc_matches_sklearn(seed: int, n_levels: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (20, 18, 9)
    if n_levels:  # heavy ties
        prob = rng.integers(0, n_levels, size=shape) / n_levels
    else:  # continuous float32 scores
        prob = rng.random(shape).astype(np.float32)
    truth = rng.random(shape) < prob * 0.4 + 0.02
    mask = rng.random(shape) < 0.8
    expected = average_precision_score(truth.ravel(), prob.ravel())
    assert auprc(prob, truth) == pytest.approx(expected, abs=1e-9)
    expected_masked = average_precision_score(truth[mask], prob[mask])
    assert auprc(prob, truth, mask=mask) == pytest.approx(expected_masked, abs=1e-9)


def test_auprc_empty_truth_and_empty_mask() -> None:
    prob = np.linspace(0, 1, 8).reshape(2, 2, 2)
    assert math.isnan(auprc(prob, np.zeros((2, 2, 2))))
    # truth only outside the mask -> empty inside -> nan
    truth = np.zeros((2, 2, 2))
    truth[0, 0, 0] = 1
    mask = np.ones((2, 2, 2), dtype=bool)
    mask[0, 0, 0] = False
    assert math.isnan(auprc(prob, truth, mask=mask))
    with pytest.raises(EmptyMaskError):
        auprc(prob, truth, mask=np.zeros((2, 2, 2), dtype=bool))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def test_evaluate_collects_hand_values() -> None:
    # The k=1 shift along the thick axis: 27 voxels each, 18 shared (z = 1, 2 of A).
    # TP=18, FP=9, FN=9 -> dice = 36/54 = 2/3, sensitivity = precision = 18/27 = 2/3;
    # HD95 = 2, ASSD = 19/26 as derived above.
    a = cube((7, 7, 8), (2, 2, 2))
    b = cube((7, 7, 8), (2, 2, 3))
    result = evaluate(a, b, spacing=(1, 1, 2))
    assert list(result) == ["dice", "sensitivity", "precision", "hd95", "assd"]
    assert result["dice"] == pytest.approx(2 / 3, abs=1e-15)
    assert result["sensitivity"] == pytest.approx(2 / 3, abs=1e-15)
    assert result["precision"] == pytest.approx(2 / 3, abs=1e-15)
    assert result["hd95"] == pytest.approx(2.0, abs=1e-12)
    assert result["assd"] == pytest.approx(19 / 26, abs=1e-12)
    assert all(type(v) is float for v in result.values())


def test_evaluate_with_probability_map() -> None:
    # truth: 2 voxels; prob ranks one positive first, then a negative, then the other positive,
    # rest 0: >=0.9: P=1, R=1/2; >=0.8: P=1/2; >=0.7: P=2/3, R=1 -> AP = 1/2 + 1/3 = 5/6.
    truth = np.zeros((3, 3, 3), dtype=bool)
    truth[0, 0, 0] = truth[2, 2, 2] = True
    prob = np.zeros((3, 3, 3))
    prob[0, 0, 0], prob[1, 1, 1], prob[2, 2, 2] = 0.9, 0.8, 0.7
    result = evaluate(prob > 0.75, truth, prob=prob)
    assert set(result) == {"dice", "sensitivity", "precision", "hd95", "assd", "auprc"}
    assert result["auprc"] == pytest.approx(5 / 6, abs=1e-15)
    # pred = {(0,0,0), (1,1,1)}: TP=1, FP=1, FN=1 -> dice 1/2
    assert result["dice"] == pytest.approx(0.5, abs=1e-15)


def test_evaluate_empty_policy() -> None:
    empty = np.zeros((3, 3, 3), dtype=bool)
    result = evaluate(empty, empty)
    assert result["dice"] == 1.0 and result["hd95"] == 0.0 and result["assd"] == 0.0
    assert math.isnan(result["sensitivity"]) and math.isnan(result["precision"])
    truth = empty.copy()
    truth[1, 1, 1] = True
    missed = evaluate(empty, truth)
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0
    assert math.isnan(missed["precision"])
    assert missed["hd95"] == math.inf and missed["assd"] == math.inf


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("func", [dice, sensitivity, precision, hd95, assd, evaluate, auprc])
def test_shape_mismatch_raises(func) -> None:
    a = np.zeros((4, 4, 4))
    b = np.zeros((4, 4, 5))
    with pytest.raises(SpaceMismatchError):
        func(a, b)


def test_mask_and_prob_shape_mismatch() -> None:
    truth = np.zeros((4, 4, 4))
    with pytest.raises(SpaceMismatchError):
        auprc(np.zeros((4, 4, 4)), truth, mask=np.ones((4, 4, 3)))
    with pytest.raises(SpaceMismatchError):
        evaluate(truth, truth, prob=np.zeros((3, 4, 4)))


@pytest.mark.parametrize(
    "spacing", [(1, 1), (1, 1, 1, 1), (1, 0, 1), (1, -2, 1), (1, math.nan, 1), ("a", 1, 1), 2.0]
)
@pytest.mark.parametrize("func", [hd95, assd, evaluate])
def test_bad_spacing_raises(func, spacing) -> None:
    a = cube((5, 5, 5), (1, 1, 1))
    with pytest.raises(InvalidImageError) as info:
        func(a, a, spacing)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CGCRefineError)


def test_distance_metrics_need_3d() -> None:
    a = np.ones((4, 4), dtype=bool)
    with pytest.raises(InvalidImageError):
        hd95(a, a)
    with pytest.raises(InvalidImageError):
        assd(a[None, None], a[None, None])


def test_non_finite_or_non_numeric_inputs_raise() -> None:
    good = np.zeros((3, 3, 3))
    bad = good.copy()
    bad[0, 0, 0] = math.nan
    with pytest.raises(InvalidImageError):
        dice(bad, good)
    with pytest.raises(InvalidImageError):
        hd95(good, bad)
    with pytest.raises(InvalidImageError):
        auprc(bad, good)
    with pytest.raises(InvalidImageError):
        dice(np.full((3, 3, 3), "x"), good)


def test_public_names() -> None:
    assert set(metrics_all) == {
        "dice",
        "sensitivity",
        "precision",
        "hd95",
        "assd",
        "auprc",
        "evaluate",
        "HD95_METHODS",
    }


# --------------------------------------------------------------------------------------------
# HD95: the two definitions (issue 13, item 12)
# --------------------------------------------------------------------------------------------


def _line_masks() -> tuple[np.ndarray, np.ndarray]:
    """Two one-voxel-thick masks on a 1 x 1 x 21 line (every voxel is surface).

    truth T: voxels z = 0..9; pred P: voxels z = 0 and z = 20.
    P -> T: z=0 -> 0, z=20 -> 11 (nearest truth voxel z=9): d_PT = [0, 11].
    T -> P: z=k -> min(k, 20 - k) = k for k = 0..9:       d_TP = [0, 1, ..., 9].
    """
    pred = np.zeros((1, 1, 21), dtype=bool)
    pred[0, 0, [0, 20]] = True
    truth = np.zeros((1, 1, 21), dtype=bool)
    truth[0, 0, :10] = True
    return pred, truth


def test_hd95_max_directed_by_hand() -> None:
    # P95(d_PT = [0, 11]): position 0.95 * 1 = 0.95 -> 0 + 0.95 * 11 = 10.45.
    # P95(d_TP = [0..9]):  position 0.95 * 9 = 8.55 -> 8 + 0.55 * 1 = 8.55.
    # max_directed = max(10.45, 8.55) = 10.45; with 2 mm along z every distance doubles: 20.9.
    pred, truth = _line_masks()
    assert hd95(pred, truth) == pytest.approx(10.45, abs=1e-12)
    assert hd95(pred, truth, method="max_directed") == pytest.approx(10.45, abs=1e-12)
    assert hd95(pred, truth, (1, 1, 2)) == pytest.approx(20.9, abs=1e-12)
    assert hd95(truth, pred) == pytest.approx(10.45, abs=1e-12)  # symmetric


def test_hd95_pooled_by_hand() -> None:
    # Pooled (MedPy): sorted union [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11], 12 values;
    # position 0.95 * 11 = 10.45 -> value[10] + 0.45 * (value[11] - value[10])
    # = 9 + 0.45 * 2 = 9.9; with 2 mm along z: 19.8.
    pred, truth = _line_masks()
    assert hd95(pred, truth, method="pooled") == pytest.approx(9.9, abs=1e-12)
    assert hd95(pred, truth, (1, 1, 2), method="pooled") == pytest.approx(19.8, abs=1e-12)
    assert hd95(truth, pred, method="pooled") == pytest.approx(9.9, abs=1e-12)


def test_hd95_methods_differ_when_one_surface_is_much_larger() -> None:
    # truth: one voxel z=0; pred: 40 voxels z = 0..39 (1 x 1 x 40 line).
    # d_PT = [0, 1, ..., 39]; d_TP = [0].
    # max_directed: P95([0..39]) = 0.95 * 39 = 37.05.
    # pooled: union [0, 0, 1, ..., 39] (41 values), position 0.95 * 40 = 38 -> value[38] = 37.
    pred = np.ones((1, 1, 40), dtype=bool)
    truth = np.zeros((1, 1, 40), dtype=bool)
    truth[0, 0, 0] = True
    assert hd95(pred, truth) == pytest.approx(37.05, abs=1e-12)
    assert hd95(pred, truth, method="pooled") == pytest.approx(37.0, abs=1e-12)


def test_hd95_method_in_evaluate_and_empty_policy() -> None:
    pred, truth = _line_masks()
    assert evaluate(pred, truth)["hd95"] == pytest.approx(10.45, abs=1e-12)
    assert evaluate(pred, truth, hd95_method="pooled")["hd95"] == pytest.approx(9.9, abs=1e-12)
    empty = np.zeros_like(pred)
    for method in ("max_directed", "pooled"):
        assert hd95(empty, empty, method=method) == 0.0
        assert hd95(pred, empty, method=method) == math.inf


def test_hd95_unknown_method() -> None:
    pred, truth = _line_masks()
    with pytest.raises(ValueError, match="max_directed"):
        hd95(pred, truth, method="medpy")
    with pytest.raises(ValueError, match="pooled"):
        evaluate(pred, truth, hd95_method="mean")
