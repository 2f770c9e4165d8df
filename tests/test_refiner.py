"""Refiner, training and configuration: API conventions, determinism, save/load, end to end."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from cgc_refine.config import ConfigError, RefinerConfig
from cgc_refine.exceptions import CheckpointError, InvalidPriorError, OutputExistsError
from cgc_refine.io import Volume
from cgc_refine.metrics import dice
from cgc_refine.phantom import make_phantom, noisy_prior
from cgc_refine.refiner import Refiner

TINY = RefinerConfig(
    channels=(4, 8, 16, 32), crop_size=(32, 32, 16), iterations=3, batch_size=2,
    learning_rate=3e-3, log_every=1, proj_dim=8,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "field, value",
    [
        ("channels", (8,)),
        ("temperature", 0.0),
        ("lambda_cg", -1.0),
        ("iterations", 0),
        ("learning_rate", 2.0),
        ("overlap", 1.0),
        ("threshold", 1.0),
        ("crop_size", (32, 32)),
        ("patch_size", (0, 2, 2)),
        ("norm", "layer"),
        ("inference_window", (30, 32, 32)),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=field.split("_")[0]):
        dataclasses.replace(RefinerConfig(), **{field: value}).validate()


def test_config_defaults_follow_the_paper():
    config = RefinerConfig().validate()
    assert config.crop_size == (192, 192, 64)
    assert config.downsample_factor == 8  # 192x192x64 -> 24x24x8 bottleneck
    assert (config.temperature, config.lambda_cg, config.lambda_fg) == (0.2, 1.0, 1.0)
    assert (config.batch_size, config.learning_rate, config.patch_size) == (2, 1e-4, (6, 6, 4))


def test_config_dict_round_trip():
    config = RefinerConfig.fast(temperature=0.3).validate()
    assert RefinerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        RefinerConfig.from_dict({**config.to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------------- refiner
def test_not_fitted_and_sklearn_conventions(phantom):
    refiner = Refiner("gmm", config=TINY, device="cpu", random_state=7)
    with pytest.raises(NotFittedError):
        refiner.predict_proba(phantom.volume)
    params = refiner.get_params()
    assert params["config"] is TINY and params["random_state"] == 7 and params["prior"] == "gmm"
    copy = clone(refiner)
    assert copy.get_params()["config"] == TINY and copy is not refiner


def test_fit_validates_parameters_in_fit(phantom):
    refiner = Refiner("gmm", config=dataclasses.replace(TINY, temperature=-1.0), device="cpu")
    with pytest.raises(ConfigError, match="temperature"):
        refiner.fit([phantom.volume])
    with pytest.raises(InvalidPriorError, match="unknown built-in prior"):
        Refiner("otsu", config=TINY, device="cpu").fit([phantom.volume])
    with pytest.raises(InvalidPriorError, match="one prior per volume"):
        Refiner([phantom.truth, phantom.truth], config=TINY, device="cpu").fit([phantom.volume])


def test_empty_prior_is_refused(phantom):
    empty = np.zeros(phantom.brain.shape, np.float32)
    with pytest.raises(InvalidPriorError, match="empty"):
        Refiner([empty], prior_kind="probability", config=TINY, device="cpu").fit(
            [phantom.volume], brain_masks=[phantom.brain]
        )


def test_fit_returns_self_with_fitted_attributes(phantom):
    refiner = Refiner("gmm", config=TINY, device="cpu")
    assert refiner.fit([phantom.volume], brain_masks=[phantom.brain]) is refiner
    assert refiner.n_channels_in_ == 1 and refiner.n_iter_ == TINY.iterations
    # crop_size is in mm (1 mm voxels): 32x32x16 mm on 1x1x2 mm voxels is 32x32x8 voxels
    assert refiner.crop_size_ == (32, 32, 8)
    assert len(refiner.history_) == TINY.iterations
    assert {"total", "bce", "coarse", "fine"} <= set(refiner.history_[0])
    assert refiner.priors_[0]["source"] == "gmm"
    proba = refiner.predict_proba(phantom.volume, phantom.brain)
    assert proba.shape == phantom.brain.shape and proba.dtype == np.float32
    assert proba.min() >= 0.0 and proba.max() <= 1.0
    assert np.all(proba[~phantom.brain] == 0.0)
    mask = refiner.predict(phantom.volume, phantom.brain, threshold=0.5)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


def test_identical_seeds_give_identical_models(phantom):
    def fitted(seed: int) -> dict[str, torch.Tensor]:
        return Refiner("gmm", config=TINY, device="cpu", random_state=seed).fit(
            [phantom.volume], brain_masks=[phantom.brain]
        ).network_.state_dict()

    first, second, other = fitted(0), fitted(0), fitted(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_save_load_round_trip(tmp_path, phantom):
    refiner = Refiner("gmm", config=TINY, device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    path = refiner.save(tmp_path / "model.pt")
    with pytest.raises(OutputExistsError):
        refiner.save(path)
    loaded = Refiner.load(path, device="cpu")
    assert loaded.config_ == refiner.config_ and loaded.n_channels_in_ == 1
    np.testing.assert_array_equal(
        loaded.predict_proba(phantom.volume, phantom.brain),
        refiner.predict_proba(phantom.volume, phantom.brain),
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_resume_continues_to_the_same_model(tmp_path, phantom):
    config = dataclasses.replace(TINY, iterations=4)
    straight = Refiner("gmm", config=config, device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    checkpoint = tmp_path / "ckpt.pt"
    Refiner("gmm", config=dataclasses.replace(config, iterations=2), device="cpu").fit(
        [phantom.volume], brain_masks=[phantom.brain], checkpoint_path=checkpoint, checkpoint_every=2
    )
    resumed = Refiner("gmm", config=config, device="cpu").fit(
        [phantom.volume], brain_masks=[phantom.brain], resume_from=checkpoint
    )
    a, b = straight.network_.state_dict(), resumed.network_.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_load_rejects_corrupted_file(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        Refiner.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        Refiner.load(tmp_path / "missing.pt")


def test_predict_rejects_other_channel_count(tmp_path, phantom):
    refiner = Refiner("gmm", config=TINY, device="cpu").fit([phantom.volume], brain_masks=[phantom.brain])
    two = Volume.from_array(np.stack([phantom.volume.data[0]] * 2), affine=phantom.volume.affine)
    with pytest.raises(CheckpointError, match="1 channel"):
        refiner.predict_proba(two, phantom.brain)


def test_refined_mask_beats_a_noisy_prior():
    """Tiny end-to-end fit: the network, trained on a corrupted prior, beats that prior.

    A quarter of the brain voxels of the prior have their label flipped: thresholding it
    keeps every flip, while a network fitted to it with BCE learns the conditional mean,
    which sits above 0.5 in the lesions and below it elsewhere.
    """
    phantom = make_phantom((48, 48, 24), spacing=(1.0, 1.0, 2.0), n_lesions=3, seed=2)
    prior = noisy_prior(phantom.truth, phantom.brain, flip_fraction=0.25, blur=0.5, seed=0)
    prior_dice = dice(prior >= 0.5, phantom.truth)
    # The network alone (no clean-up, no augmentation): what BCE learns from a noisy label.
    config = dataclasses.replace(TINY, iterations=60, log_every=20, cleanup="none", intensity_augmentation=False,
                                 target_weighting="none", anisotropic=False, tta=1, crop_size=(32, 32, 32))
    refiner = Refiner([prior], prior_kind="probability", config=config, device="cpu", random_state=0)
    refined = refiner.fit([phantom.volume], brain_masks=[phantom.brain]).predict(phantom.volume, phantom.brain)
    refined_dice = dice(refined, phantom.truth)
    assert prior_dice < 0.5
    assert refined_dice > max(0.7, prior_dice + 0.3), (prior_dice, refined_dice)


def test_full_prior_inside_a_derived_brain_mask_is_refused(phantom):
    """A prior of 1 everywhere in the brain (0 outside) is 'full' even without a given mask."""
    full = phantom.brain.astype(np.float32)
    with pytest.raises(InvalidPriorError, match="every brain voxel"):
        Refiner([full], prior_kind="probability", config=TINY, device="cpu").fit([phantom.volume])
