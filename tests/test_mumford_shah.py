"""Tests of the two-phase Mumford-Shah (Chan-Vese) prior on synthetic phantoms."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cgc_refine.exceptions import (
    CGCRefineError,
    DeviceUnavailableError,
    EmptyMaskError,
    InvalidImageError,
    InvalidPriorError,
    SpaceMismatchError,
)
from cgc_refine.priors.base import ProbabilityMap
from cgc_refine.priors.mumford_shah import MumfordShahPrior, mumford_shah_probability


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _distance(shape, centre=None, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Distance in mm from ``centre`` (voxel coordinates; default: the volume centre)."""
    if centre is None:
        centre = [(s - 1) / 2.0 for s in shape]
    axes = [(np.arange(n) - c) * h for n, c, h in zip(shape, centre, spacing)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(sum(g**2 for g in grids))


def _phantom(
    shape=(48, 48, 40), radius=8.0, contrast=3.0, noise=1.0, seed=0, spacing=(1.0, 1.0, 1.0)
):
    """A bright sphere in Gaussian noise, inside a spherical 'brain' mask, with a shifted
    constant outside (as in a z-scored, skull-stripped image)."""
    rng = np.random.default_rng(seed)
    distance = _distance(shape, spacing=spacing)
    mask = distance < 0.45 * min(n * h for n, h in zip(shape, spacing))
    sphere = distance < radius
    image = rng.normal(0.0, noise, shape) + contrast * sphere
    image[~mask] = -5.0
    return image.astype(np.float32), mask, sphere


@dataclass
class _Volume:
    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


# ---------------------------------------------------------------------------------------------
# recovery and output contract
# ---------------------------------------------------------------------------------------------


def test_sphere_is_recovered():
    image, mask, sphere = _phantom()
    probability, info = mumford_shah_probability(image, mask)
    assert _dice(probability >= 0.5, sphere) > 0.9
    assert info["c_fg_bright"] > info["c_bg_bright"]
    # the soft map is confident away from the boundary
    distance = _distance(image.shape)
    assert probability[distance < 5].min() > 0.9
    assert probability[mask & (distance > 12)].mean() < 0.02


def test_output_contract():
    image, mask, _ = _phantom(seed=1)
    probability, info = mumford_shah_probability(image, mask)
    assert probability.shape == image.shape
    assert probability.dtype == np.float32
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    assert np.all(probability[~mask] == 0.0)
    json.dumps(info)  # JSON-serialisable
    for key in ("n_iter", "energy", "c_fg", "c_bg", "converged", "epsilon", "foreground_fraction"):
        assert key in info
    assert isinstance(info["energy"], float) and np.isfinite(info["energy"])
    assert info["converged"]
    assert 0.0 < info["foreground_fraction"] < 0.2


def test_foreground_is_bright_phase_even_when_larger_than_background():
    shape = (48, 48, 48)
    mask = np.zeros(shape, dtype=bool)
    mask[2:46, 2:46, 2:46] = True
    sphere = (_distance(shape) < 24.0) & mask
    assert sphere[mask].mean() > 0.6  # the bright phase is the larger one
    image = np.random.default_rng(0).normal(0.0, 1.0, shape) + 3.0 * sphere
    probability, info = mumford_shah_probability(image, mask)
    assert _dice(probability >= 0.5, sphere) > 0.9
    assert info["c_fg"][0] > info["c_bg"][0]
    assert info["foreground_fraction"] > 0.5


def test_bright_channel_decides_the_orientation():
    image, mask, sphere = _phantom(seed=2)
    inverted = np.where(mask, -image, 0.0)  # the sphere is dark here
    stacked = np.stack([inverted, image])
    probability, info = mumford_shah_probability(stacked, mask, bright_channel=1)
    assert _dice(probability >= 0.5, sphere) > 0.9
    assert info["c_fg"][1] > info["c_bg"][1] and info["c_fg"][0] < info["c_bg"][0]
    with pytest.raises(InvalidPriorError, match="bright_channel"):
        mumford_shah_probability(stacked, mask, bright_channel=2)


def test_anisotropic_spacing():
    spacing = (1.0, 1.0, 2.5)
    image, mask, sphere = _phantom(shape=(48, 48, 20), spacing=spacing, seed=3)
    probability, info = mumford_shah_probability(image, mask, spacing)
    assert _dice(probability >= 0.5, sphere) > 0.9
    assert info["spacing"] == [1.0, 1.0, 2.5]
    # through the prior class, with the spacing taken from the volume
    affine = np.diag([*spacing, 1.0])
    pmap = MumfordShahPrior().compute(_Volume(image, affine, spacing), mask)
    assert pmap.params["spacing"] == [1.0, 1.0, 2.5]
    np.testing.assert_array_equal(pmap.affine, affine)
    assert _dice(pmap.data >= 0.5, sphere) > 0.9


def test_deterministic():
    image, mask, _ = _phantom(seed=4)
    first, info1 = mumford_shah_probability(image, mask)
    second, info2 = mumford_shah_probability(image, mask)
    np.testing.assert_array_equal(first, second)
    info1.pop("seconds"), info2.pop("seconds")
    assert info1 == info2


def test_torch_input_matches_numpy():
    image, mask, _ = _phantom(seed=5)
    from_numpy, _ = mumford_shah_probability(image, mask)
    from_torch, info = mumford_shah_probability(torch.from_numpy(image), torch.from_numpy(mask))
    np.testing.assert_array_equal(from_numpy, from_torch)
    assert info["device"] == "cpu"


def test_prior_class_returns_probability_map():
    image, mask, sphere = _phantom(seed=6)
    prior = MumfordShahPrior(device="cpu")
    pmap = prior.compute(image, mask)
    assert isinstance(pmap, ProbabilityMap)
    assert pmap.source == "mumford-shah"
    assert pmap.shape == image.shape and pmap.data.dtype == np.float32
    assert np.all(pmap.data[~mask] == 0.0)
    assert _dice(pmap.data >= 0.5, sphere) > 0.9
    params = pmap.params
    json.dumps(params)
    assert params["length_weight"] == prior.length_weight
    assert params["modality"] == "mri" and params["device"] == "cpu"
    assert params["c_fg_bright"] > params["c_bg_bright"]
    assert "energy" in params and "epsilon_used" in params


def test_prior_class_derives_the_mask():
    image, mask, sphere = _phantom(seed=7)
    pmap = MumfordShahPrior(device="cpu").compute(image)  # outside is the constant -5
    assert _dice(pmap.data >= 0.5, sphere) > 0.9
    assert np.all(pmap.data[~mask] == 0.0)


def test_ct_modality():
    rng = np.random.default_rng(8)
    shape = (40, 40, 32)
    distance = _distance(shape)
    brain = distance < 17
    bleed = _distance(shape, centre=(24, 20, 16)) < 5
    hu = np.full(shape, -1000.0)  # air
    hu[brain] = rng.normal(32.0, 4.0, int(brain.sum()))  # grey/white matter
    hu[bleed] = rng.normal(70.0, 4.0, int(bleed.sum()))  # acute blood, hyperdense
    pmap = MumfordShahPrior(modality="ct", device="cpu").compute(hu, brain)
    assert _dice(pmap.data >= 0.5, bleed) > 0.9
    # the CT as the second channel of two: bright_channel picks the one that is windowed
    other = rng.normal(0.0, 1.0, shape).astype(np.float32)
    stacked = np.stack([other, hu])
    pmap = MumfordShahPrior(modality="ct", bright_channel=1, device="cpu").compute(stacked, brain)
    assert _dice(pmap.data >= 0.5, bleed) > 0.9


def test_length_weight_zero_is_two_means():
    image, mask, _ = _phantom(seed=9, noise=0.3)
    probability, info = mumford_shah_probability(image, mask, length_weight=0.0)
    assert info["c_fg_bright"] > info["c_bg_bright"]
    assert probability.max() <= 1.0 and np.all(probability[~mask] == 0.0)


def test_parameters_are_stored_as_given():
    prior = MumfordShahPrior(length_weight=-1, n_iter="many", device="tpu")
    assert prior.get_params()["length_weight"] == -1
    assert prior.n_iter == "many" and prior.device == "tpu"
    assert "MumfordShahPrior(" in repr(prior)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length_weight": -1.0}, "length_weight"),
        ({"length_weight": float("nan")}, "length_weight"),
        ({"n_iter": 0}, "n_iter"),
        ({"n_iter": 2.5}, "n_iter"),
        ({"bright_channel": -1}, "bright_channel"),
        ({"bright_channel": 1}, "bright_channel"),
        ({"modality": "pet"}, "modality"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"tol": -1e-3}, "tol"),
        ({"init_percentile": 100.0}, "init_percentile"),
        ({"dark_floor_quantile": 1.0}, "dark_floor_quantile"),
        ({"device": "tpu"}, "device"),
        ({"device": 3}, "device"),
    ],
)
def test_invalid_parameters(kwargs, match):
    image, mask, _ = _phantom(shape=(16, 16, 16), radius=3)
    with pytest.raises(InvalidPriorError, match=match) as excinfo:
        MumfordShahPrior(**kwargs).compute(image, mask)
    assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, CGCRefineError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_iter_soft": -1}, "n_iter_soft"),
        ({"update_every": 0}, "update_every"),
        ({"multiscale": "yes"}, "multiscale"),
        ({"length_weight": True}, "length_weight"),
    ],
)
def test_invalid_core_parameters(kwargs, match):
    image, mask, _ = _phantom(shape=(16, 16, 16), radius=3)
    with pytest.raises(InvalidPriorError, match=match):
        mumford_shah_probability(image, mask, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_requested_but_unavailable():
    image, mask, _ = _phantom(shape=(16, 16, 16), radius=3)
    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        MumfordShahPrior(device="cuda").compute(image, mask)
    with pytest.raises(DeviceUnavailableError):
        mumford_shah_probability(image, mask, device="cuda:0")
    # "auto" falls back to the CPU
    assert MumfordShahPrior(device="auto").compute(image, mask).params["device_used"] == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():  # pragma: no cover - only where a GPU is present
    image, mask, sphere = _phantom(seed=10)
    on_cpu, _ = mumford_shah_probability(image, mask, device="cpu")
    on_gpu, info = mumford_shah_probability(torch.from_numpy(image).cuda(), mask)
    assert info["device"].startswith("cuda")
    assert _dice(on_gpu >= 0.5, sphere) > 0.9
    assert np.abs(on_cpu - on_gpu).mean() < 1e-3


# ---------------------------------------------------------------------------------------------
# bad images and masks
# ---------------------------------------------------------------------------------------------


def test_empty_mask():
    image, mask, _ = _phantom(shape=(16, 16, 16), radius=3)
    empty = np.zeros_like(mask)
    with pytest.raises(EmptyMaskError, match="empty"):
        mumford_shah_probability(image, empty)
    with pytest.raises(EmptyMaskError, match="empty"):
        MumfordShahPrior().compute(image, empty)


def test_constant_image():
    mask = _distance((16, 16, 16)) < 7
    constant = np.full(mask.shape, 3.0, dtype=np.float32)
    with pytest.raises(InvalidImageError, match="constant"):
        mumford_shah_probability(constant, mask)
    with pytest.raises(InvalidImageError, match="constant"):
        MumfordShahPrior().compute(constant, mask)


def test_shape_mismatch_and_bad_inputs():
    image, mask, _ = _phantom(shape=(16, 16, 16), radius=3)
    with pytest.raises(SpaceMismatchError, match="shape"):
        mumford_shah_probability(image, mask[:-1])
    with pytest.raises(InvalidImageError, match="3-D"):
        mumford_shah_probability(image[0], mask[0])
    with pytest.raises(InvalidImageError, match="spacing"):
        mumford_shah_probability(image, mask, (1.0, 0.0, 1.0))
    with_nan = image.copy()
    with_nan[8, 8, 8] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        mumford_shah_probability(with_nan, mask)
