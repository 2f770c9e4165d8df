"""Training crops (cgc_refine.sampling): sampler state, the batch iterator."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cgc_refine.config import RefinerConfig
from cgc_refine.data import prepare_subject
from cgc_refine.distributed import DistributedContext
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import ProbabilityMap
from cgc_refine.sampling import CropSampler, batch_iterator


@pytest.fixture(scope="module")
def subject():
    phantom = make_phantom((32, 32, 16), n_lesions=2, seed=1)
    return prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)


def test_crop_sampler_shapes_padding_and_determinism(phantom):
    prior = ProbabilityMap(phantom.truth.astype(np.float32))
    subject = prepare_subject(phantom.volume, prior, phantom.brain)
    crop = (32, 32, 32)  # deeper than the 20-slice phantom: padded
    first = CropSampler([subject], crop, 0.5, seed=3).batch(2)
    second = CropSampler([subject], crop, 0.5, seed=3).batch(2)
    assert first[0].shape == (2, 1, 32, 32, 32) and first[2].dtype == torch.bool
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_crop_sampler_oversamples_prior_foreground(phantom):
    prior = ProbabilityMap(phantom.truth.astype(np.float32))
    subject = prepare_subject(phantom.volume, prior, phantom.brain)
    sampler = CropSampler([subject], (16, 16, 8), foreground_oversampling=1.0, seed=0)
    for _ in range(5):
        _, crop_prior, _ = sampler.batch(1)
        assert crop_prior.max() >= 0.5


def test_state_round_trip_replays_the_same_batches(subject) -> None:
    sampler = CropSampler([subject], (16, 16, 8), seed=4)
    sampler.batch(2)
    state = sampler.state()
    assert "augmentation" in state
    expected = sampler.batch(3)
    other = CropSampler([subject], (16, 16, 8), seed=99)
    other.set_state(state)
    for a, b in zip(other.batch(3), expected):
        assert torch.equal(a, b)


def test_crops_stay_inside_the_subject_and_carry_the_prior(subject) -> None:
    sampler = CropSampler([subject], (8, 8, 8), foreground_oversampling=1.0, seed=0)
    for _ in range(4):
        image, prior, brain = sampler.batch(1)
        assert image.shape == (1, 1, 8, 8, 8) and brain.dtype == torch.bool and prior.max() >= 0.5


def test_in_process_iterator_is_the_sampler(subject) -> None:
    config = dataclasses.replace(RefinerConfig(), batch_size=2, num_workers=0)
    batches = batch_iterator(CropSampler([subject], (16, 16, 8), seed=7), config, torch.device("cpu"),
                             DistributedContext(), seed=0)
    reference = CropSampler([subject], (16, 16, 8), seed=7)
    for _ in range(2):
        for a, b in zip(next(batches), reference.batch(2)):
            assert torch.equal(a, b)
    batches.close()
