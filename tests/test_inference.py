"""Tests of cgc_refine.inference: window placement, importance map, sliding-window blending."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from cgc_refine.exceptions import InvalidImageError
from cgc_refine.inference import (
    IMPORTANCE_FLOOR,
    gaussian_importance_map,
    sliding_window_predict,
    window_starts,
)


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Recorder:
    """Predictor that records what it is called with and returns its input."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.batch_sizes: list[int] = []
        self.inference_mode: list[bool] = []
        self.autocast: list[bool] = []
        self.windows: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.devices.append(x.device)
        self.batch_sizes.append(int(x.shape[0]))
        self.inference_mode.append(torch.is_inference_mode_enabled())
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        if x.device.type == "meta":
            return torch.zeros(x.shape)  # on the CPU, so it can be moved to the output device
        self.windows.append(x.clone())
        return x


# ----------------------------------------------------------------------------- window_starts


@pytest.mark.parametrize(
    ("size", "roi", "overlap", "expected"),
    [
        (10, 4, 0.5, [0, 2, 4, 6]),
        (11, 4, 0.5, [0, 2, 4, 6, 7]),
        (8, 4, 0.0, [0, 4]),
        (9, 4, 0.0, [0, 4, 5]),
        (6, 4, 0.75, [0, 1, 2]),
        (4, 4, 0.5, [0]),
        (3, 8, 0.5, [0]),
        (5, 3, 0.9, [0, 1, 2]),  # stride never drops below 1
    ],
)
def test_window_starts_known_values(size: int, roi: int, overlap: float, expected: list[int]) -> None:
    assert window_starts(size, roi, overlap) == expected


@pytest.mark.parametrize("size", [1, 5, 16, 17, 31, 64, 97])
@pytest.mark.parametrize("roi", [1, 4, 7, 16])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.6])
def test_window_starts_cover_every_index_and_snap(size: int, roi: int, overlap: float) -> None:
    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0
    assert starts == sorted(set(starts))
    if size <= roi:
        assert starts == [0]
        return
    assert starts[-1] == size - roi  # snapped to the border, never past it
    covered = set()
    for s in starts:
        covered.update(range(s, s + roi))
    assert covered == set(range(size))
    stride = max(1, int(roi * (1 - overlap)))
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize(
    ("size", "roi", "overlap"),
    [(0, 4, 0.5), (4, 0, 0.5), (4, 2, 1.0), (4, 2, -0.1), (4, 2, math.nan), (4.0, 2, 0.5)],
)
def test_window_starts_rejects_bad_arguments(size, roi, overlap) -> None:
    with pytest.raises(ValueError):
        window_starts(size, roi, overlap)


# ------------------------------------------------------------------------- importance map


@pytest.mark.parametrize("roi", [(8, 8, 8), (5, 6, 7), (1, 3, 16)])
def test_importance_map_properties(roi: tuple[int, int, int]) -> None:
    m = gaussian_importance_map(roi)
    assert m.shape == roi
    assert m.dtype == torch.float32
    assert m.max().item() == 1.0
    assert m.min().item() >= IMPORTANCE_FLOOR > 0
    for axis in range(3):
        torch.testing.assert_close(m, m.flip(axis), rtol=0, atol=1e-7)
    # The centre carries the largest weight and the corner the smallest.
    centre = tuple((n - 1) // 2 for n in roi)
    assert m[centre].item() == 1.0
    assert m[0, 0, 0].item() == m.min().item()


def test_importance_map_decreases_from_centre_and_follows_sigma() -> None:
    m = gaussian_importance_map((1, 1, 41), sigma_scale=0.25, dtype=torch.float64)[0, 0]
    half = m[20:]
    assert torch.all(half[1:] < half[:-1])
    sigma = 0.25 * 41
    assert m[30].item() == pytest.approx(math.exp(-0.5 * (10 / sigma) ** 2))


def test_importance_map_floor_and_dtype() -> None:
    m = gaussian_importance_map((32, 32, 32), sigma_scale=0.02, dtype=torch.float64)
    assert m.dtype == torch.float64
    assert m.min().item() == pytest.approx(IMPORTANCE_FLOOR)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"roi_size": (4, 4)},
        {"roi_size": (4, 0, 4)},
        {"roi_size": (4, 4.5, 4)},
        {"roi_size": (4, 4, 4), "sigma_scale": 0.0},
        {"roi_size": (4, 4, 4), "dtype": torch.int64},
    ],
)
def test_importance_map_rejects_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        gaussian_importance_map(**kwargs)


# ------------------------------------------------------------------------ sliding window

# (input shape, roi, overlap, sw_batch_size)
COMBOS = [
    ((1, 1, 16, 16, 16), (8, 8, 8), 0.5, 1),
    ((1, 2, 10, 12, 7), (4, 5, 3), 0.5, 3),  # sizes not divisible by the roi
    ((2, 1, 9, 3, 11), (4, 5, 4), 0.25, 4),  # one axis smaller than the roi
    ((1, 3, 3, 5, 4), (6, 6, 6), 0.5, 2),  # whole volume smaller than the roi
    ((1, 1, 12, 8, 6), (4, 4, 3), 0.0, 5),  # exact tiling, no overlap
    ((1, 1, 13, 7, 9), (5, 4, 6), 0.8, 16),  # heavy overlap, odd padding
]


@pytest.mark.parametrize(("shape", "roi", "overlap", "sw_batch_size"), COMBOS)
def test_identity_constant_mode_is_exact(shape, roi, overlap, sw_batch_size) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-50, 50, shape, generator=g).float()  # integers: the average is exact
    out = sliding_window_predict(
        x, identity, roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="constant"
    )
    assert out.shape == x.shape
    assert torch.equal(out, x)


@pytest.mark.parametrize("padding_mode", ["constant", "replicate"])
@pytest.mark.parametrize(("shape", "roi", "overlap", "sw_batch_size"), COMBOS)
def test_identity_gaussian_mode(shape, roi, overlap, sw_batch_size, padding_mode) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out = sliding_window_predict(
        x, identity, roi, overlap=overlap, sw_batch_size=sw_batch_size, padding_mode=padding_mode
    )
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_float64_predictions_are_accumulated_in_float64() -> None:
    x = torch.randn(1, 1, 11, 9, 10, dtype=torch.float64)
    out = sliding_window_predict(x, identity, (4, 4, 4))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_constant_predictor_gives_constant(mode: str) -> None:
    def predictor(w: torch.Tensor) -> torch.Tensor:
        return torch.full((w.shape[0], 2, *w.shape[2:]), 3.25)

    x = torch.randn(2, 1, 13, 6, 9)
    out = sliding_window_predict(x, predictor, (5, 8, 4), mode=mode, overlap=0.4)
    assert out.shape == (2, 2, 13, 6, 9)
    torch.testing.assert_close(out, torch.full_like(out, 3.25), rtol=1e-6, atol=0)


def test_pointwise_conv_matches_whole_volume() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, kernel_size=1).eval()
    x = torch.randn(1, 2, 14, 10, 9)
    with torch.no_grad():
        expected = conv(x)
    out = sliding_window_predict(x, conv, (6, 4, 5), mode="constant", sw_batch_size=4)
    assert out.shape == (1, 3, 14, 10, 9)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out_g = sliding_window_predict(x, conv, (6, 4, 5), mode="gaussian")
    torch.testing.assert_close(out_g, expected, rtol=1e-5, atol=1e-5)


def _unaffected_by_window_borders(size: int, roi: int, overlap: float) -> torch.Tensor:
    """1-D mask of indices that lie inside every window covering them (or on the volume edge)."""
    starts = window_starts(size, roi, overlap)
    good = torch.ones(size, dtype=torch.bool)
    for i in range(size):
        for s in starts:
            if s <= i < s + roi:
                left_ok = i > s or s == 0
                right_ok = i < s + roi - 1 or s + roi == size
                good[i] &= left_ok and right_ok
    return good


def test_3x3x3_conv_matches_whole_volume_away_from_window_borders() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()
    shape, roi, overlap = (20, 18, 16), (8, 8, 8), 0.5
    x = torch.randn(1, 1, *shape)
    with torch.no_grad():
        expected = conv(x)
    out = sliding_window_predict(x, conv, roi, overlap=overlap, mode="gaussian")
    masks = [_unaffected_by_window_borders(s, r, overlap) for s, r in zip(shape, roi)]
    good = masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]
    assert 0.1 < good.float().mean() < 1.0  # the comparison covers a real part of the volume
    torch.testing.assert_close(out[0][:, good], expected[0][:, good], rtol=1e-5, atol=1e-5)
    # ... and the window-border zero padding really does change the other voxels.
    assert not torch.allclose(out[0][:, ~good], expected[0][:, ~good], atol=1e-3)


def test_padding_of_small_volumes_is_symmetric_and_cropped() -> None:
    x = torch.arange(1.0, 4.0).reshape(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2).contiguous()
    for padding_mode, first_plane in (("constant", 0.0), ("replicate", 1.0)):
        rec = Recorder()
        out = sliding_window_predict(x, rec, (6, 2, 2), padding_mode=padding_mode)
        assert torch.equal(out, x)
        (window,) = rec.windows
        assert window.shape == (1, 1, 6, 2, 2)
        # 3 voxels padded to 6: one plane before, two after.
        assert torch.all(window[0, 0, 0] == first_plane)
        assert torch.equal(window[0, 0, 1:4], x[0, 0])
        last = 0.0 if padding_mode == "constant" else 3.0
        assert torch.all(window[0, 0, 4:] == last)


def test_output_device_and_compute_device_are_separate() -> None:
    x = torch.randn(1, 1, 9, 9, 9)
    rec = Recorder()
    out = sliding_window_predict(x, rec, (4, 4, 4), sw_device="cpu", device=torch.device("cpu"))
    assert out.device == torch.device("cpu")
    assert rec.devices and all(d == torch.device("cpu") for d in rec.devices)

    # Accumulate on the meta device: only the output device sees the result.
    rec = Recorder()
    out = sliding_window_predict(x, rec, (4, 4, 4), sw_device="cpu", device="meta")
    assert out.device.type == "meta"
    assert out.shape == x.shape
    assert all(d.type == "cpu" for d in rec.devices)

    # Run the predictor on the meta device: windows are moved there before each call.
    rec = Recorder()
    out = sliding_window_predict(x, rec, (4, 4, 4), sw_device="meta", device="cpu")
    assert all(d.type == "meta" for d in rec.devices)
    assert out.device.type == "cpu"
    assert torch.equal(out, torch.zeros_like(x))


def test_batches_progress_and_inference_mode() -> None:
    x = torch.randn(2, 1, 10, 10, 6)
    roi, overlap = (4, 4, 4), 0.5
    total = 2 * math.prod(len(window_starts(s, r, overlap)) for s, r in zip(x.shape[2:], roi))
    calls: list[tuple[int, int]] = []
    rec = Recorder()
    sliding_window_predict(
        x, rec, roi, overlap=overlap, sw_batch_size=7, progress=lambda d, t: calls.append((d, t))
    )
    assert sum(rec.batch_sizes) == total
    assert max(rec.batch_sizes) == 7
    assert len(rec.batch_sizes) == math.ceil(total / 7)
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})
    assert all(t == total for _, t in calls)
    assert all(rec.inference_mode)


def test_result_is_an_ordinary_tensor() -> None:
    out = sliding_window_predict(torch.randn(1, 1, 5, 5, 5), identity, (4, 4, 4))
    assert not out.is_inference()
    out.clamp_(0, 1)  # in-place edits must work outside inference mode


def test_autocast_is_ignored_on_cpu() -> None:
    rec = Recorder()
    x = torch.randn(1, 1, 6, 6, 6)
    out = sliding_window_predict(x, rec, (4, 4, 4), autocast_dtype=torch.bfloat16)
    assert rec.autocast and not any(rec.autocast)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x)


def test_network_in_training_mode_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    net = torch.nn.Conv3d(1, 1, 1)
    x = torch.randn(1, 1, 4, 4, 4)
    with caplog.at_level(logging.WARNING, logger="cgc_refine.inference"):
        sliding_window_predict(x, net, (4, 4, 4))
    assert "eval()" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgc_refine.inference"):
        sliding_window_predict(x, net.eval(), (4, 4, 4))
    assert caplog.text == ""


@pytest.mark.parametrize(
    "kwargs",
    [
        {"roi_size": (4, 4)},
        {"roi_size": (4, 0, 4)},
        {"roi_size": (4, True, 4)},
        {"roi_size": "444"},
        {"overlap": 1.0},
        {"overlap": -0.2},
        {"sw_batch_size": 0},
        {"sw_batch_size": 2.0},
        {"mode": "median"},
        {"padding_mode": "reflect"},
        {"autocast_dtype": torch.float32},
        {"progress": 3},
    ],
)
def test_sliding_window_rejects_bad_arguments(kwargs) -> None:
    args = {"roi_size": (4, 4, 4), **kwargs}
    with pytest.raises(ValueError):
        sliding_window_predict(torch.zeros(1, 1, 6, 6, 6), identity, **args)


@pytest.mark.parametrize("inputs", [torch.zeros(1, 6, 6, 6), torch.zeros(1, 0, 6, 6, 6)])
def test_sliding_window_rejects_bad_inputs(inputs: torch.Tensor) -> None:
    with pytest.raises(InvalidImageError, match="5-D|empty"):
        sliding_window_predict(inputs, identity, (4, 4, 4))


def test_predictor_with_wrong_output_shape_is_reported() -> None:
    def shrinking(w: torch.Tensor) -> torch.Tensor:
        return w[:, :, 1:-1, 1:-1, 1:-1]

    with pytest.raises(ValueError, match="same padding"):
        sliding_window_predict(torch.zeros(1, 1, 6, 6, 6), shrinking, (4, 4, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_unavailable_cuda_is_reported() -> None:
    from cgc_refine.exceptions import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="CUDA"):
        sliding_window_predict(torch.zeros(1, 1, 4, 4, 4), identity, (4, 4, 4), sw_device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_network_on_cuda_stitched_on_cpu() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()
    x = torch.randn(1, 1, 20, 18, 16)
    expected = sliding_window_predict(x, conv, (8, 8, 8))
    gpu_conv = copy.deepcopy(conv).cuda()
    seen: list[torch.device] = []

    def on_gpu(w: torch.Tensor) -> torch.Tensor:
        seen.append(w.device)
        return gpu_conv(w)

    out = sliding_window_predict(x, on_gpu, (8, 8, 8), sw_device="cuda", device="cpu")
    assert out.device.type == "cpu" and all(d.type == "cuda" for d in seen)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    half = sliding_window_predict(
        x, on_gpu, (8, 8, 8), sw_device="cuda", device="cpu", autocast_dtype=torch.bfloat16
    )
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, expected, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------- per-axis factors


@pytest.mark.parametrize(
    ("crop", "shapes", "factor", "expected"),
    [
        # int factor: the historical behaviour
        ((64, 64, 64), [(50, 70, 13)], 8, (56, 64, 16)),
        ((64, 64, 64), [(50, 70, 13)], (8, 8, 8), (56, 64, 16)),
        # thick slices, the slice axis is never pooled: 13 slices stay 13, not 16
        ((64, 64, 64), [(50, 70, 13)], (8, 8, 1), (56, 64, 13)),
        ((128, 128, 16), [(200, 230, 48), (180, 180, 40)], (8, 8, 1), (128, 128, 16)),
        # mixed factors: rounded down to 4 on z, at least one multiple
        ((64, 64, 10), [(100, 100, 100)], (8, 8, 4), (64, 64, 8)),
        ((64, 64, 2), [(100, 100, 100)], (8, 8, 4), (64, 64, 4)),
    ],
)
def test_effective_crop_size_accepts_int_or_per_axis_factor(crop, shapes, factor, expected) -> None:
    from cgc_refine.training import effective_crop_size

    assert effective_crop_size(crop, shapes, factor) == expected


@pytest.mark.parametrize("factor", [0, (8, 8), (8, 0, 1), "8"])
def test_effective_crop_size_rejects_bad_factor(factor) -> None:
    from cgc_refine.training import effective_crop_size

    with pytest.raises(ValueError, match="factor"):
        effective_crop_size((64, 64, 64), [(64, 64, 64)], factor)


def test_multiple_of_checks_the_window_per_axis() -> None:
    x = torch.rand(1, 1, 20, 20, 7)
    # (16, 16, 5) is a valid window of a (8, 8, 1) network ...
    y = sliding_window_predict(x, identity, (16, 16, 5), multiple_of=(8, 8, 1))
    torch.testing.assert_close(y, x)
    # ... but not of an isotropic one: the error names the factors and a usable size
    with pytest.raises(ValueError, match=r"\(8, 8, 8\).*\(16, 16, 8\)"):
        sliding_window_predict(x, identity, (16, 16, 5), multiple_of=8)
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        sliding_window_predict(x, identity, (12, 16, 5), multiple_of=(8, 8, 1))
    with pytest.raises(ValueError, match="multiple_of"):
        sliding_window_predict(x, identity, (16, 16, 5), multiple_of=(8, 8))


def test_thick_slice_network_through_sliding_window() -> None:
    from cgc_refine.model import CGCUNet, anisotropic_strides
    from cgc_refine.training import effective_crop_size

    torch.manual_seed(0)
    strides = anisotropic_strides((0.47, 0.47, 8.0), 2)
    net = CGCUNet(1, channels=(4, 8, 16), proj_dim=8, strides=strides).eval()
    volume = torch.randn(1, 1, 40, 36, 7, generator=torch.Generator().manual_seed(1))
    roi = effective_crop_size((32, 32, 64), [volume.shape[2:]], net.downsample_factors)
    assert roi == (32, 32, 7)  # every slice in one window: no slice padding needed
    out = sliding_window_predict(
        volume, net, roi, overlap=0.5, multiple_of=net.downsample_factors
    )
    assert out.shape == (1, 1, 40, 36, 7)
    assert torch.isfinite(out).all()
    # windows start at x in {0, 8}, y in {0, 4}: the corner x < 8, y < 4 is seen by the first
    # window only, so there the blend is that window's own output
    with torch.no_grad():
        first = net(volume[..., :32, :32, :])
    torch.testing.assert_close(out[..., :8, :4, :], first[..., :8, :4, :])
