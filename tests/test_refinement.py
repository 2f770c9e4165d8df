"""Label-free steps around the network (cgc_refine.refinement): TTA boxes, self-training targets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cgc_refine.config import RefinerConfig
from cgc_refine.data import prepare_subject
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import ProbabilityMap
from cgc_refine.refinement import next_targets, predict_box

CONFIG = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), tta=4, cleanup="none")


class _Constant(torch.nn.Module):
    """Logit 2 everywhere (probability 0.88): every flipped copy agrees."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], 2.0)


@pytest.fixture(scope="module")
def subject():
    phantom = make_phantom((24, 24, 16), n_lesions=2, seed=3)
    subject = prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    subject.info["spacing"] = [1.0, 1.0, 1.0]
    return subject


def test_predict_box_is_zero_outside_the_brain(subject) -> None:
    probability, agreement = predict_box(_Constant(), subject, CONFIG, (16, 16, 16), torch.device("cpu"))
    brain = subject.brain[0].numpy()
    assert probability.shape == brain.shape and probability.dtype == np.float32
    assert np.all(probability[~brain] == 0.0)
    np.testing.assert_allclose(probability[brain], 1.0 / (1.0 + np.exp(-2.0)), rtol=1e-5)
    assert agreement == pytest.approx(1.0)


def test_next_targets_take_the_prediction_and_record_the_change(subject) -> None:
    updated, record = next_targets(_Constant(), [subject], dataclasses.replace(CONFIG, tta=1), 2,
                                   window=(16, 16, 16), device=torch.device("cpu"), random_state=0)
    brain = subject.brain[0].numpy()
    previous = subject.prior[0].numpy() >= 0.5
    assert record["round"] == 2 and record["voxels_changed"] == [int((brain != previous).sum())]
    assert updated[0].image is subject.image and len(updated[0].foreground) == int(brain.sum())
    assert record["tta_agreement"] == [pytest.approx(1.0)]


def test_next_targets_blend_with_the_first_round_target_as_the_output_does(subject) -> None:
    """The constant network says 0.88 everywhere in the brain; blended with a hard (0/1)
    reference the target is the reference itself (c = 1 everywhere), unblended it is 0.88."""
    config = dataclasses.replace(CONFIG, tta=1, output_blend="confidence")
    reference = subject.prior  # the phantom's truth: a hard map
    blended, _ = next_targets(_Constant(), [subject], config, 2, window=(16, 16, 16),
                              device=torch.device("cpu"), random_state=0, blend_references=[reference])
    np.testing.assert_allclose(blended[0].prior[0].numpy(), reference[0].numpy(), atol=1e-6)
    plain, _ = next_targets(_Constant(), [subject], dataclasses.replace(config, output_blend="none"), 2,
                            window=(16, 16, 16), device=torch.device("cpu"), random_state=0,
                            blend_references=[reference])
    brain = subject.brain[0].numpy()
    np.testing.assert_allclose(plain[0].prior[0].numpy()[brain], 1.0 / (1.0 + np.exp(-2.0)), rtol=1e-5)
