"""Per-subject intensity alignment (issue 10, item 6): the boundary, the shift, the estimator."""

import numpy as np
import pytest
import torch

from cgc_refine.alignment import align_subject, decision_boundary
from cgc_refine.config import RefinerConfig
from cgc_refine.data import prepare_subject
from cgc_refine.exceptions import InvalidParameterError
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import ProbabilityMap
from cgc_refine.refiner import Refiner


def _rule(x: np.ndarray, boundary: float, width: float = 0.1) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-(x - boundary) / width))).astype(np.float32)


@pytest.mark.parametrize("boundary", [1.3, 2.0])
def test_boundary_of_a_logistic_rule_is_found(boundary):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0.0, 1.0, 20_000), rng.normal(3.0, 0.5, 2_000)]).reshape(22, 10, 100)
    brain = np.ones(x.shape, dtype=bool)
    assert decision_boundary(x, _rule(x, boundary), brain) == pytest.approx(boundary, abs=0.02)


def test_no_boundary_for_a_prior_that_does_not_rise_with_the_intensity():
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (20, 20, 20))
    brain = np.ones(x.shape, dtype=bool)
    assert decision_boundary(x, _rule(-x, 1.5), brain) is None  # a dark-lesion rule
    assert decision_boundary(x, np.zeros_like(x, dtype=np.float32), brain) is None  # empty prior


def test_align_subject_moves_only_the_prior_channel_and_keeps_the_input():
    phantom = make_phantom((24, 24, 16), n_lesions=2, seed=3)
    flair = phantom.volume.data[0]
    two = np.stack([flair, np.sqrt(np.abs(flair))])  # a second, non-linear channel
    subject = prepare_subject(two, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    before = subject.image.clone()
    aligned = align_subject(subject, subject.prior)
    shift = aligned.info["alignment_shift"]
    assert shift is not None and shift > 0  # the phantom's lesions are bright
    torch.testing.assert_close(aligned.image[0], before[0] - shift)
    torch.testing.assert_close(aligned.image[1], before[1])
    torch.testing.assert_close(subject.image, before)  # the input subject is untouched


def test_priors_with_different_rules_get_one_rule_after_alignment():
    """One image, two priors that call lesion above 1 and above 2 robust SD: after alignment
    both rules sit at 0, which is what a cohort network then sees."""
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=5)
    subject = prepare_subject(phantom.volume, ProbabilityMap(phantom.truth.astype(np.float32)), phantom.brain)
    intensity = subject.image[0].numpy()
    brain = subject.brain[0].numpy()
    shifts = []
    for boundary in (1.0, 2.0):
        prior = torch.from_numpy(np.where(brain, _rule(intensity, boundary), 0.0).astype(np.float32))[None]
        aligned = align_subject(subject, prior)
        shifts.append(aligned.info["alignment_shift"])
        assert decision_boundary(aligned.image[0].numpy(), prior[0].numpy(), brain) == pytest.approx(0.0, abs=0.05)
    assert shifts[1] - shifts[0] == pytest.approx(1.0, abs=0.05)


def test_an_aligned_model_needs_the_prior_at_prediction():
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=5)
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=2, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1, intensity_alignment="prior", tta=1,
                           cleanup="none", cleanup_output=False)
    prior = phantom.truth.astype(np.float32)
    refiner = Refiner([prior], prior_kind="probability", config=config, device="cpu")
    refiner.fit([phantom.volume], brain_masks=[phantom.brain])
    assert refiner.alignment_shifts_[0] is not None and refiner.alignment_shifts_[0] > 0
    with pytest.raises(InvalidParameterError, match="pass the subject's prior"):
        refiner.predict_proba(phantom.volume, phantom.brain)
    probability = refiner.predict_proba(phantom.volume, phantom.brain, prior=prior)
    assert probability.shape == phantom.truth.shape and 0.0 <= probability.min() <= probability.max() <= 1.0


def test_alignment_off_records_no_shift():
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=5)
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1, tta=1)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                      device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    assert refiner.alignment_shifts_ == [None]
    refiner.predict_proba(phantom.volume, phantom.brain)  # no prior needed
