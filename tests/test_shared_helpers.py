"""The helpers written once for the whole package: validation, device, errors, prior base."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cgc_refine import exceptions
from cgc_refine._validation import as_3d, check_spacing
from cgc_refine.device import autocast, fp32_region, resolve_device
from cgc_refine.exceptions import (
    CGCRefineError,
    DeviceUnavailableError,
    InvalidGeometryError,
    InvalidImageError,
    InvalidParameterError,
    InvalidPriorError,
)


@pytest.mark.parametrize("spacing", [(1, 1, 2), [0.5, 0.5, 3.0], np.array([1.0, 1.0, 1.0], np.float32)])
def test_check_spacing_accepts_three_positive_numbers(spacing) -> None:
    values = check_spacing(spacing)
    assert len(values) == 3 and all(isinstance(v, float) for v in values)


@pytest.mark.parametrize(
    "spacing", [(1, 1), (1, 0, 1), (1, -1, 1), (1, float("nan"), 1), "111", 2.0, (True, 1, 1), ("a", 1, 1)]
)
def test_check_spacing_raises_the_callers_error(spacing) -> None:
    with pytest.raises(InvalidImageError, match="spacing"):
        check_spacing(spacing)
    with pytest.raises(InvalidGeometryError, match="size_mm"):
        check_spacing(spacing, "size_mm", error=InvalidGeometryError)


def test_check_spacing_hint_ends_the_message() -> None:
    with pytest.raises(InvalidImageError, match="pass e.g. volume.spacing$"):
        check_spacing((1, 1), hint="; pass e.g. volume.spacing")


def test_as_3d() -> None:
    volume = np.zeros((2, 3, 4))
    assert as_3d(volume, "mask") is volume
    assert as_3d(np.zeros((2, 3, 4, 5)), "image", first_channel=True).shape == (3, 4, 5)
    with pytest.raises(InvalidImageError, match="mask must be a 3-D array"):
        as_3d(np.zeros((3, 4)), "mask")
    with pytest.raises(InvalidPriorError, match="3-D"):
        as_3d(np.zeros((2, 3, 4, 5)), "prior", error=InvalidPriorError)


def test_resolve_device_default_and_invalid_error() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None, default=torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DeviceUnavailableError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(InvalidPriorError, match="device"):
        resolve_device("tpu", invalid=InvalidPriorError)
    with pytest.raises(InvalidPriorError, match="device must be"):
        resolve_device(3, invalid=InvalidPriorError)  # type: ignore[arg-type]
    with pytest.raises(InvalidPriorError, match="not supported"):
        resolve_device("meta", invalid=InvalidPriorError)


def test_autocast_is_a_no_op_off_cuda() -> None:
    conv = torch.nn.Conv3d(1, 1, 1)
    x = torch.ones(1, 1, 2, 2, 2)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), None), fp32_region(torch.device("cpu")):
        assert conv(x).dtype == torch.float32


def test_every_error_class_lives_in_exceptions() -> None:
    from cgc_refine.cleanup import CleanupError
    from cgc_refine.model.geometry import InvalidGeometryError as FromGeometry
    from cgc_refine.report import MissingDependencyError

    assert MissingDependencyError is exceptions.MissingDependencyError
    assert FromGeometry is exceptions.InvalidGeometryError
    assert CleanupError is exceptions.CleanupError
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, CGCRefineError) and cls.__module__ == "cgc_refine.exceptions"
    assert issubclass(MissingDependencyError, ImportError)


def test_model_and_inference_raise_project_errors() -> None:
    from cgc_refine.inference import sliding_window_predict, window_starts
    from cgc_refine.model import CGCLoss, ResidualUNet3D

    with pytest.raises(InvalidParameterError, match="overlap"):
        window_starts(10, 4, 1.5)
    with pytest.raises(InvalidParameterError, match="predictor must map"):
        sliding_window_predict(torch.zeros(1, 1, 4, 4, 4), lambda w: w[:, :, :2], (4, 4, 4))
    with pytest.raises(InvalidParameterError, match="norm"):
        ResidualUNet3D(1, norm="layer")
    with pytest.raises(ValueError):  # still a ValueError for callers that catch those
        CGCLoss(lambda_cg=-1.0)


def test_prior_base_is_shared_and_public() -> None:
    from cgc_refine.preprocessing import PriorInput, prepare_prior_input
    from cgc_refine.priors import GMMPrior, MumfordShahPrior, OutlierPrior, Prior, base

    assert base.prepare_prior_input is prepare_prior_input and base.PriorInput is PriorInput
    sources = {cls: cls.source for cls in (GMMPrior, MumfordShahPrior, OutlierPrior)}
    assert sources == {GMMPrior: "gmm", MumfordShahPrior: "mumford-shah", OutlierPrior: "outlier"}
    for cls in sources:
        assert issubclass(cls, Prior) and "compute" not in vars(cls)
    prior = MumfordShahPrior(length_weight=2.0)
    assert prior.get_params()["length_weight"] == 2.0 and "length_weight=2.0" in repr(prior)


@pytest.mark.parametrize("cls_name", ["MumfordShahPrior", "OutlierPrior"])
def test_bright_channel_beyond_the_image_is_a_prior_error(cls_name: str) -> None:
    import cgc_refine.priors as priors

    image = np.random.default_rng(0).normal(100, 10, (2, 12, 12, 12)).astype(np.float32)
    with pytest.raises(InvalidPriorError, match="bright_channel=2 but the image has 2 channel"):
        getattr(priors, cls_name)(bright_channel=2).compute(image, np.ones((12, 12, 12), bool))


def test_adapters_reexport_the_encodings() -> None:
    from cgc_refine.priors import adapters, encodings

    for name in ("ADAPTER_KINDS", "AUTO_TOLERANCE", "AUTO_MAX_LABELS", "infer_prior_kind"):
        assert getattr(adapters, name) is getattr(encodings, name)
    percent = np.arange(300, dtype=float).reshape(3, 10, 10) / 3  # 0 .. 99.7, not integers
    kind, reason, plain = encodings.infer_reading(percent)
    assert kind == "percent" and not plain
    assert reason.endswith("a maximum between 50 and 100: a probability map stored as 0-100, "
                           "divided by 100; anomaly scores in that range need --prior-kind scores")
