"""The label-free refinement recipe: clean-up, augmentation, target weights, TTA, rounds, guard."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cgc_refine import Refiner, RefinerConfig
from cgc_refine.augment import IntensityAugmentation
from cgc_refine.cleanup import CleanupError, CleanupSettings, ball, clean_probability, decide_pattern
from cgc_refine.config import ConfigError
from cgc_refine.phantom import make_phantom
from cgc_refine.refiner import collapse_warning, tta_flips
from cgc_refine.training import CropSampler, crop_in_voxels, prepare_subject, target_weights

RAS = np.diag([1.0, 1.0, 1.0, 1.0])


def _sphere(shape, centre, radius):
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


# ------------------------------------------------------------------------------ clean-up
def test_focal_cleanup_drops_specks_and_fills_the_core():
    """One tumour with a dark core plus scattered bright specks: specks go, the core fills."""
    shape = (60, 60, 40)
    tumour = _sphere(shape, (20, 30, 20), 10) & ~_sphere(shape, (20, 30, 20), 4)  # a shell
    specks = np.zeros(shape, bool)
    for x, y, z in [(50, 10, 5), (52, 50, 30), (45, 45, 10), (55, 20, 35)]:
        specks[x, y, z] = specks[x + 1, y, z] = True
    prior = (tumour | specks).astype(np.float32) * 0.9
    result = clean_probability(prior, (1.0, 1.0, 1.0), CleanupSettings(pattern="auto"), affine=RAS)
    assert result.info["pattern"] == "focal"
    assert not result.mask[specks].any()
    assert result.mask[_sphere(shape, (20, 30, 20), 3)].all()  # the enclosed core is lesion now
    # the prior's own soft value is kept where the decision did not change
    assert result.probability[tumour].max() == pytest.approx(0.9)
    assert result.probability[_sphere(shape, (20, 30, 20), 3)].min() == 1.0


def test_multifocal_cleanup_keeps_every_focus_and_drops_only_specks():
    """Twelve 3-mm lesions on both sides: auto says multifocal; all foci kept, the speck dropped."""
    shape = (64, 64, 32)
    rng = np.random.default_rng(0)
    lesions = np.zeros(shape, bool)
    centres = [(int(x), int(y), int(z)) for x, y, z in zip(rng.integers(6, 58, 12), rng.integers(6, 58, 12),
                                                             rng.integers(5, 27, 12))]
    for centre in centres:
        lesions |= _sphere(shape, centre, 2)
    speck = np.zeros(shape, bool)
    speck[2, 2, 2] = True
    result = clean_probability((lesions | speck).astype(np.float32), (1.0, 1.0, 1.0),
                               CleanupSettings(pattern="auto"), affine=RAS)
    assert result.info["pattern"] == "multifocal"
    assert result.mask[lesions].all()
    assert not result.mask[speck].any()
    # no closing in the multifocal pattern: nothing between foci is added
    assert int(result.mask.sum()) == int(lesions.sum())


def test_auto_pattern_needs_one_sided_dominant_mass():
    """A single large component spanning both hemispheres (confluent WMH) is not 'focal'."""
    shape = (60, 40, 20)
    bilateral = np.zeros(shape, bool)
    bilateral[15:45, 15:25, 8:12] = True
    assert decide_pattern(bilateral, affine=RAS)[0] == "multifocal"
    assert decide_pattern(bilateral)[0] == "focal"  # without an affine only dominance is tested
    one_sided = np.zeros(shape, bool)
    one_sided[5:25, 15:25, 8:12] = True
    assert decide_pattern(one_sided, affine=RAS)[0] == "focal"


def test_ball_respects_thick_slices():
    element = ball(2.0, (0.5, 0.5, 8.0))
    assert element.shape == (9, 9, 1)
    assert ball(2.0, (1.0, 1.0, 1.0)).shape == (5, 5, 5)


def test_cleanup_none_is_identity_and_bad_settings_raise():
    prior = np.random.default_rng(1).random((10, 10, 10)).astype(np.float32)
    result = clean_probability(prior, (1, 1, 1), CleanupSettings(pattern="none"))
    np.testing.assert_array_equal(result.probability, prior)
    with pytest.raises(CleanupError, match="pattern"):
        clean_probability(prior, (1, 1, 1), CleanupSettings(pattern="tumour"))
    with pytest.raises(CleanupError, match="closing_mm"):
        clean_probability(prior, (1, 1, 1), CleanupSettings(closing_mm=-1))


# --------------------------------------------------------------------------- augmentation
def test_intensity_augmentation_changes_the_image_only():
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=0)
    prior = phantom.truth.astype(np.float32)
    from cgc_refine.priors import ProbabilityMap

    subject = prepare_subject(phantom.volume, ProbabilityMap(prior), phantom.brain)
    plain = CropSampler([subject], (16, 16, 8), 0.5, seed=4).batch(6)
    augmented = CropSampler([subject], (16, 16, 8), 0.5, seed=4,
                            augmentation=IntensityAugmentation(p=1.0)).batch(6)
    # The same generator draws the crops first, so crops, flips, targets and masks agree ...
    torch.testing.assert_close(plain[1], augmented[1])
    torch.testing.assert_close(plain[2], augmented[2])
    # ... while every image changed, and stayed zero outside the brain.
    assert not torch.allclose(plain[0], augmented[0])
    outside = ~augmented[2].bool().expand_as(augmented[0])
    assert float(augmented[0][outside].abs().max()) == 0.0


# ------------------------------------------------------------------------- target weights
def test_confidence_weights_by_hand():
    prior = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    torch.testing.assert_close(target_weights(prior, "confidence"), torch.tensor([1.0, 0.5, 0.0, 0.8, 1.0]))
    assert target_weights(prior, "none") is None
    with pytest.raises(ValueError, match="weighting"):
        target_weights(prior, "margin")


def test_weighted_bce_ignores_zero_weight_voxels():
    from cgc_refine.model.losses import masked_bce_with_logits

    logits = torch.tensor([2.0, -1.0, 5.0])
    target = torch.tensor([1.0, 0.0, 0.5])
    weight = torch.tensor([1.0, 1.0, 0.0])
    expected = (torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.nn.functional.softplus(torch.tensor(-1.0))) / 2
    torch.testing.assert_close(masked_bce_with_logits(logits, target, weight=weight), expected)


# ---------------------------------------------------------------------------------- TTA
def test_tta_flip_sets():
    assert tta_flips(1) == [()]
    assert tta_flips(2) == [(), (0,)]
    assert sorted(tta_flips(8)) == sorted([(), (0,), (1,), (0, 1), (2,), (0, 2), (1, 2), (0, 1, 2)])


def test_tta_of_a_flip_equivariant_network_is_exact():
    """A network that is a per-voxel function is flip-equivariant: TTA must equal one pass."""
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=3)
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(2, 2, 2), log_every=1, tta=1, cleanup="none", cleanup_output=False)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config, device="cpu")
    refiner.fit([phantom.volume], brain_masks=[phantom.brain])

    class PointWise(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1] * 2.0 - 1.0

    refiner.network_ = PointWise()
    single = refiner.predict_proba(phantom.volume, phantom.brain)
    refiner.config_ = dataclasses.replace(refiner.config_, tta=8)
    averaged = refiner.predict_proba(phantom.volume, phantom.brain)
    np.testing.assert_allclose(averaged, single, atol=1e-6)
    assert refiner.tta_agreement_ == pytest.approx(1.0)


# ----------------------------------------------------------------------- rounds and guard
def test_two_rounds_record_label_free_facts():
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=5)
    config = RefinerConfig(channels=(4, 8, 16), crop_size=(16, 16, 16), iterations=2, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1, rounds=2, tta=2)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                      device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    assert len(refiner.rounds_) == 1 and refiner.rounds_[0]["round"] == 2
    assert {round(h["round"]) for h in refiner.history_} == {1, 2}
    assert 0.0 <= refiner.rounds_[0]["tta_agreement"][0] <= 1.0


def test_guard_falls_back_on_collapse():
    assert collapse_warning(1000, 100) is not None
    assert collapse_warning(1000, 900) is None
    assert collapse_warning(0, 10) is None
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=6)
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                      device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    reference = phantom.truth.astype(np.uint8)
    collapsed = np.zeros_like(reference)
    mask, message = refiner.guard(collapsed, reference)
    assert message and "fell back" in message
    np.testing.assert_array_equal(mask, reference)
    refiner.config_ = dataclasses.replace(refiner.config_, fallback=False)
    mask, message = refiner.guard(collapsed, reference)
    assert message and not mask.any()


def test_crop_in_millimetres_and_anisotropic_network():
    assert crop_in_voxels((64, 64, 32), (0.47, 0.47, 8.0)) == (136, 136, 4)
    phantom = make_phantom((48, 48, 12), spacing=(0.5, 0.5, 4.0), n_lesions=2, seed=7)
    config = RefinerConfig(channels=(4, 8, 16), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                      device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    assert refiner.strides_ == [[2, 2, 1], [2, 2, 1]]
    assert refiner.crop_size_ == (32, 32, 4)


@pytest.mark.parametrize("field,value", [("cleanup", "tumour"), ("rounds", 0), ("tta", 3),
                                         ("target_weighting", "margin")])
def test_recipe_settings_are_validated(field, value):
    with pytest.raises(ConfigError, match=field):
        RefinerConfig(**{field: value}).validate()


def test_saved_model_keeps_its_strides(tmp_path):
    phantom = make_phantom((48, 48, 12), spacing=(0.5, 0.5, 4.0), n_lesions=2, seed=8)
    config = RefinerConfig(channels=(4, 8, 16), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1, tta=1)
    refiner = Refiner([phantom.truth.astype(np.float32)], prior_kind="probability", config=config,
                      device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    refiner.save(tmp_path / "m.pt")
    loaded = Refiner.load(tmp_path / "m.pt", device="cpu")
    assert loaded.strides_ == refiner.strides_
    np.testing.assert_allclose(loaded.predict_proba(phantom.volume, phantom.brain),
                               refiner.predict_proba(phantom.volume, phantom.brain), atol=1e-6)


def test_confidence_blend_by_hand():
    from cgc_refine.refiner import blend_with_prior

    prior = np.array([0.0, 0.5, 0.75, 1.0], dtype=np.float32)
    network = np.array([0.9, 0.9, 0.0, 0.2], dtype=np.float32)
    # c = |2p - 1| = 1, 0, 0.5, 1: the prior where sure, the network where not, a mix between
    np.testing.assert_allclose(blend_with_prior(network, prior), [0.0, 0.9, 0.375, 1.0])


def test_predict_blends_with_the_given_prior():
    phantom = make_phantom((32, 32, 16), spacing=(1.0, 1.0, 1.0), n_lesions=2, seed=9)
    prior = phantom.truth.astype(np.float32)
    config = RefinerConfig(channels=(4, 8), crop_size=(16, 16, 16), iterations=1, batch_size=1, proj_dim=4,
                           patch_size=(1, 1, 1), log_every=1, tta=1, cleanup="none")
    refiner = Refiner([prior], prior_kind="probability", config=config, device="cpu").fit(
        [phantom.volume], brain_masks=[phantom.brain])
    blended = refiner.predict_proba(phantom.volume, phantom.brain, prior=prior)
    # a hard prior is certain everywhere: the blend is the prior itself
    np.testing.assert_allclose(blended, prior, atol=1e-6)
    plain = refiner.predict_proba(phantom.volume, phantom.brain)
    np.testing.assert_allclose(plain, refiner.network_probability_)
