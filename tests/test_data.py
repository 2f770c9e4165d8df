"""Data preparation (cgc_refine.data): prepared subjects, new targets, crop geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cgc_refine.data import (
    BBOX_MARGIN,
    PreparedSubject,
    crop_in_voxels,
    effective_crop_size,
    prepare_subject,
    with_target,
)
from cgc_refine.exceptions import SpaceMismatchError
from cgc_refine.priors import ProbabilityMap


def test_prepare_subject_crops_to_brain_and_masks_prior(phantom):
    prior = ProbabilityMap(np.full(phantom.brain.shape, 0.7, np.float32))
    subject = prepare_subject(phantom.volume, prior, phantom.brain)
    assert subject.image.shape[1:] == subject.prior.shape[1:] == subject.brain.shape[1:]
    assert subject.shape == phantom.brain.shape
    inside = subject.brain[0].numpy()
    assert np.all(subject.prior[0].numpy()[~inside] == 0.0)
    assert np.allclose(subject.prior[0].numpy()[inside], 0.7)
    # the box holds the whole brain
    assert inside.sum() == phantom.brain.sum()


def test_box_keeps_a_margin_around_the_brain(phantom) -> None:
    subject = prepare_subject(phantom.volume, None, phantom.brain)
    assert subject.prior is None and subject.foreground.shape == (0, 3)
    for axis, box in enumerate(subject.bbox):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(phantom.brain.any(axis=other))
        assert box.start == max(int(present[0]) - BBOX_MARGIN, 0)
        assert box.stop == min(int(present[-1]) + 1 + BBOX_MARGIN, phantom.brain.shape[axis])


def test_prior_on_another_grid_is_refused(phantom) -> None:
    with pytest.raises(SpaceMismatchError, match="resample the prior"):
        prepare_subject(phantom.volume, ProbabilityMap(np.zeros((4, 4, 4), np.float32)), phantom.brain)


def test_foreground_is_capped_by_a_seeded_subsample(phantom) -> None:
    prior = ProbabilityMap(phantom.brain.astype(np.float32))
    full = prepare_subject(phantom.volume, prior, phantom.brain)
    assert len(full.foreground) == int(phantom.brain.sum())
    a = prepare_subject(phantom.volume, prior, phantom.brain, max_foreground=50, seed=3)
    b = prepare_subject(phantom.volume, prior, phantom.brain, max_foreground=50, seed=3)
    c = prepare_subject(phantom.volume, prior, phantom.brain, max_foreground=50, seed=4)
    assert a.foreground.shape == (50, 3) and np.array_equal(a.foreground, b.foreground)
    assert not np.array_equal(a.foreground, c.foreground)


def test_with_target_replaces_the_prior_and_its_foreground(phantom) -> None:
    subject = prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    subject.info["spacing"] = [1.0, 1.0, 2.0]
    target = torch.zeros_like(subject.prior)
    target[0, 2, 3, 4] = 0.9
    updated = with_target(subject, target)
    assert updated.prior is target and updated.image is subject.image and updated.brain is subject.brain
    assert updated.foreground.tolist() == [[2, 3, 4]]
    assert updated.info == subject.info and updated.info is not subject.info


def test_subject_memory_and_device(phantom) -> None:
    subject = prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    voxels = subject.brain.nelement()
    assert not subject.on_disk and subject.nbytes() == voxels * 4 + voxels + voxels * 4
    moved = subject.to(torch.device("cpu"))
    assert isinstance(moved, PreparedSubject) and torch.equal(moved.image, subject.image)


def test_crop_in_voxels_rounds_millimetres_to_at_least_one_voxel() -> None:
    assert crop_in_voxels((192, 192, 64), (0.5, 1.0, 8.0)) == (384, 192, 8)
    assert crop_in_voxels((2, 2, 2), (5.0, 5.0, 5.0)) == (1, 1, 1)


def test_effective_crop_size_clips_and_rounds():
    # largest subject 100x50x13 with factor 8: x keeps 64, y needs ceil(50/8)*8 = 56, z 16.
    assert effective_crop_size((64, 192, 64), [(100, 50, 13), (20, 20, 5)], 8) == (64, 56, 16)
    # never below the factor
    assert effective_crop_size((4, 4, 4), [(3, 3, 3)], 8) == (8, 8, 8)
