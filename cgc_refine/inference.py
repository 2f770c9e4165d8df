"""Sliding-window inference over whole volumes.

A network trained on patches is applied to a full volume by tiling it with overlapping
windows of the patch size, running the windows in small batches, and blending the window
predictions back together with a weighted average. Two devices are kept apart, as in MONAI:
``sw_device`` is where the predictor runs (a GPU, say) and ``device`` is where the windows
are stitched (by default the device the input lives on, typically the CPU), so a volume
too large for GPU memory can still be processed window by window.
"""

from __future__ import annotations

import logging
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from .device import DeviceLike, autocast
from .exceptions import DeviceUnavailableError, InvalidImageError, InvalidParameterError
from .model.geometry import as_factor_triple

__all__ = ["gaussian_importance_map", "sliding_window_predict", "window_starts"]

logger = logging.getLogger(__name__)

#: Smallest weight a voxel of the Gaussian importance map may carry, relative to the centre
#: (which is 1). It keeps window borders from getting zero (or denormal) weight, so every
#: voxel of the volume has a well-defined weighted average.
IMPORTANCE_FLOOR = 1e-3

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def _roi_tuple(roi_size: int | Sequence[int]) -> tuple[int, int, int]:
    """Validate a window size and return it as three positive Python ints."""
    items: list[int] = []
    try:
        raw = [roi_size] * 3 if isinstance(roi_size, numbers.Integral) else list(roi_size)
        if len(raw) == 3 and not any(isinstance(v, bool) for v in raw):
            items = [operator.index(v) for v in raw]
    except TypeError:
        items = []
    if len(items) != 3 or min(items) <= 0:
        raise InvalidParameterError(
            f"roi_size must be three positive integers (or one, used for every axis), "
            f"got {roi_size!r}; pass the patch size the network was trained on, e.g. (64, 64, 64)"
        )
    return items[0], items[1], items[2]


def _check_roi_multiple(roi: tuple[int, int, int], multiple_of: int | Sequence[int]) -> None:
    """Raise :class:`~cgc_refine.exceptions.InvalidParameterError` unless every axis of
    ``roi`` is a multiple of its factor."""
    factors = as_factor_triple(multiple_of, "multiple_of")
    if any(r % f for r, f in zip(roi, factors, strict=True)):
        fixed = tuple(max(f, (r // f) * f) for r, f in zip(roi, factors, strict=True))
        raise InvalidParameterError(
            f"roi_size {roi} is not a multiple of the network's down-sampling factors {factors} "
            f"(per axis X, Y, Z); the network cannot take such a window. Use e.g. {fixed} "
            "(cgc_refine.training.effective_crop_size rounds a size for you)"
        )


def _check_overlap(overlap: float) -> float:
    if (
        isinstance(overlap, bool)
        or not isinstance(overlap, int | float)
        or not math.isfinite(overlap)
        or not 0.0 <= overlap < 1.0
    ):
        raise InvalidParameterError(
            f"overlap must be a number in [0, 1), got {overlap!r}; "
            "0.5 (half a window) is the usual choice, 0 tiles without overlap"
        )
    return float(overlap)


def _as_device(value: DeviceLike | None, default: torch.device, name: str) -> torch.device:
    """Turn a device argument into a :class:`torch.device`, checking it is available."""
    if value is None:
        return default
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise InvalidParameterError(
            f"{name}={value!r} is not a device torch understands; use e.g. 'cpu' or 'cuda:0'"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"{name}={value!r} asks for CUDA, but CUDA is not available on this machine; "
            "pass 'cpu' instead or run on a machine with a CUDA GPU"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"{name}={value!r} asks for CUDA device {dev.index}, but only "
            f"{torch.cuda.device_count()} are visible; pick an index below that"
        )
    if dev.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise DeviceUnavailableError(
            f"{name}={value!r} asks for Apple MPS, which is not available here; pass 'cpu' instead"
        )
    return dev


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start indices of the windows that tile one axis.

    Consecutive windows are ``max(1, floor(roi * (1 - overlap)))`` voxels apart; the last
    window is moved back so that it ends exactly at the border, so every index in
    ``[0, size)`` is covered and no window leaves the axis.

    Parameters
    ----------
    size : int
        Length of the axis (positive).
    roi : int
        Window length along the axis (positive).
    overlap : float
        Fraction of the window shared by neighbouring windows, in [0, 1).

    Returns
    -------
    list of int
        Strictly increasing start indices, beginning at 0. When ``size <= roi`` a single
        window starting at 0 is returned (the caller pads the axis up to ``roi``).

    Raises
    ------
    InvalidParameterError
        If ``size`` or ``roi`` is not a positive integer, or ``overlap`` is outside [0, 1).

    Examples
    --------
    >>> window_starts(10, 4, 0.5)
    [0, 2, 4, 6]
    >>> window_starts(11, 4, 0.5)
    [0, 2, 4, 6, 7]
    """
    for name, value in (("size", size), ("roi", roi)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}")
    overlap = _check_overlap(overlap)
    if size <= roi:
        return [0]
    stride = max(1, int(roi * (1.0 - overlap)))
    n_windows = -(-(size - roi) // stride) + 1  # ceil division
    starts = [min(i * stride, size - roi) for i in range(n_windows)]
    return sorted(set(starts))


def gaussian_importance_map(
    roi_size: int | Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    device: DeviceLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian weights that favour the centre of a window over its borders.

    The map is the outer product of one 1-D Gaussian per axis, centred in the window with
    standard deviation ``sigma_scale * roi_size[axis]`` voxels, scaled so that its maximum
    is 1 and clamped from below at :data:`IMPORTANCE_FLOOR`, so that no voxel of a window
    gets zero weight.

    Parameters
    ----------
    roi_size : int or sequence of 3 ints
        Window size (X, Y, Z).
    sigma_scale : float or sequence of 3 floats, default 0.125
        Standard deviation as a fraction of the window size, per axis (positive).
    device : str or torch.device, optional
        Device of the returned tensor (default: CPU).
    dtype : torch.dtype, default torch.float32
        Floating dtype of the returned tensor.

    Returns
    -------
    torch.Tensor
        Tensor of shape ``roi_size``, symmetric about the window centre, with values in
        ``[IMPORTANCE_FLOOR, 1]`` and maximum exactly 1.

    Raises
    ------
    InvalidParameterError
        If ``roi_size`` is not three positive integers, ``sigma_scale`` is not positive
        and finite, or ``dtype`` is not a floating dtype.
    """
    roi = _roi_tuple(roi_size)
    scales = (sigma_scale,) * 3 if isinstance(sigma_scale, int | float) else tuple(sigma_scale)
    if len(scales) != 3 or not all(
        isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        for s in scales
    ):
        raise InvalidParameterError(
            f"sigma_scale must be a positive number (or three), got {sigma_scale!r}; "
            "0.125 (sigma = window/8) is the usual choice"
        )
    if not dtype.is_floating_point:
        raise InvalidParameterError(f"dtype must be a floating dtype, got {dtype}; use torch.float32")
    dev = torch.device("cpu") if device is None else torch.device(device)

    weights = torch.ones(roi, dtype=torch.float64)
    for axis, (n, scale) in enumerate(zip(roi, scales, strict=True)):
        coords = torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0
        g = torch.exp(-0.5 * (coords / (scale * n)) ** 2)
        shape = [1, 1, 1]
        shape[axis] = n
        weights = weights * g.reshape(shape)
    weights = weights / weights.max()
    weights = weights.clamp_min(IMPORTANCE_FLOOR)
    return weights.to(device=dev, dtype=dtype)


def sliding_window_predict(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi_size: int | Sequence[int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: Literal["constant", "replicate"] = "constant",
    sw_device: DeviceLike | None = None,
    device: DeviceLike | None = None,
    progress: Callable[[int, int], object] | None = None,
    autocast_dtype: torch.dtype | None = None,
    multiple_of: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply a patch-wise predictor to whole volumes with overlapping windows.

    The spatial extent of ``inputs`` is tiled along each axis by :func:`window_starts`;
    along an axis shorter than the window, the volume is first padded symmetrically up to
    the window size and the padding is cropped from the result. The windows of all batch
    items are run through ``predictor`` ``sw_batch_size`` at a time on ``sw_device``, and
    the outputs are moved to ``device`` and averaged there, each window weighted by the
    importance map of ``mode``. Windows are cut, predicted and stitched under
    :func:`torch.inference_mode`.

    Parameters
    ----------
    inputs : torch.Tensor
        Batch of volumes, shape (B, C, X, Y, Z).
    predictor : callable
        Maps a tensor (n, C, *roi_size) on ``sw_device`` to a tensor (n, K, *roi_size),
        e.g. a network returning logits. An ``nn.Module`` should be in eval mode (a warning
        is logged otherwise) and already on ``sw_device``.
    roi_size : int or sequence of 3 ints
        Window size (X, Y, Z), normally the training patch size.
    overlap : float, default 0.5
        Fraction of a window shared with its neighbour along each axis, in [0, 1).
    sw_batch_size : int, default 1
        Number of windows per predictor call (at least 1).
    mode : {"gaussian", "constant"}, default "gaussian"
        Blending weights: a Gaussian that favours window centres
        (:func:`gaussian_importance_map`) or a plain average.
    sigma_scale : float or sequence of 3 floats, default 0.125
        Width of the Gaussian, as a fraction of the window size (``mode="gaussian"`` only).
    padding_mode : {"constant", "replicate"}, default "constant"
        How an axis shorter than the window is padded: zeros, or copies of the edge voxels.
    sw_device : str or torch.device, optional
        Device the predictor runs on; windows are moved there. Default: ``inputs.device``.
    device : str or torch.device, optional
        Device the result is accumulated and returned on. Default: ``inputs.device``.
    progress : callable, optional
        Called as ``progress(done, total)`` after each predictor call, with the number of
        windows processed so far and in all; the last call is ``progress(total, total)``.
    autocast_dtype : torch.float16 or torch.bfloat16, optional
        Run the predictor under :func:`torch.autocast` with this dtype. Only used when
        ``sw_device`` is a CUDA device; ignored (with a debug log) elsewhere.
    multiple_of : int or sequence of 3 ints, optional
        The down-sampling factor of the network: one int for every axis (an isotropic U-Net,
        ``2 ** n_down``) or one per axis (``CGCUNet.downsample_factors``, e.g. ``(8, 8, 1)``
        for thick slices). When given, ``roi_size`` is checked to be a multiple of it along
        each axis before any window is run, so a window the network cannot take fails early
        with a message that names the factors. None (default) checks nothing.

    Returns
    -------
    torch.Tensor
        The blended predictions, shape (B, K, X, Y, Z), on ``device``; float32 unless the
        predictor returns float64. The result is an ordinary tensor (not an inference
        tensor), so it may be modified in place afterwards.

    Raises
    ------
    InvalidImageError
        If ``inputs`` is not a 5-D tensor with non-empty dimensions.
    InvalidParameterError
        If an argument is out of range, ``roi_size`` is not a multiple of ``multiple_of``, or
        the predictor returns a tensor of the wrong shape.
    DeviceUnavailableError
        If ``sw_device`` or ``device`` names a CUDA or MPS device that is not available.

    Examples
    --------
    >>> x = torch.rand(1, 1, 40, 40, 30)
    >>> y = sliding_window_predict(x, lambda w: 2 * w, roi_size=(16, 16, 16))
    >>> y.shape
    torch.Size([1, 1, 40, 40, 30])
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
        got = (
            f"shape {tuple(inputs.shape)}"
            if isinstance(inputs, torch.Tensor)
            else type(inputs).__name__
        )
        raise InvalidImageError(
            f"inputs must be a 5-D tensor (batch, channels, X, Y, Z), got {got}; "
            "add the missing axes, e.g. volume[None, None] for a single 3-D volume"
        )
    if min(inputs.shape) == 0:
        raise InvalidImageError(f"inputs has an empty dimension, shape {tuple(inputs.shape)}")
    if not callable(predictor):
        raise InvalidParameterError(
            "predictor must be callable (a network or a function), "
            f"got {type(predictor).__name__}"
        )
    roi = _roi_tuple(roi_size)
    if multiple_of is not None:
        _check_roi_multiple(roi, multiple_of)
    overlap = _check_overlap(overlap)
    if isinstance(sw_batch_size, bool) or not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise InvalidParameterError(f"sw_batch_size must be an integer >= 1, got {sw_batch_size!r}")
    if mode not in ("gaussian", "constant"):
        raise InvalidParameterError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    if padding_mode not in ("constant", "replicate"):
        raise InvalidParameterError(f"padding_mode must be 'constant' or 'replicate', got {padding_mode!r}")
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise InvalidParameterError(
            f"autocast_dtype must be torch.float16, torch.bfloat16 or None, got {autocast_dtype!r}"
        )
    if progress is not None and not callable(progress):
        raise InvalidParameterError(
            f"progress must be a callable(done, total) or None, got {type(progress).__name__}"
        )
    sw_dev = _as_device(sw_device, inputs.device, "sw_device")
    out_dev = _as_device(device, inputs.device, "device")
    if isinstance(predictor, torch.nn.Module) and predictor.training:
        logger.warning(
            "the predictor is in training mode; dropout and batch-norm statistics will make "
            "predictions noisy. Call .eval() on the network before inference"
        )

    with torch.inference_mode():
        summed, weight_sum, crop = _accumulate(
            inputs, predictor, roi, overlap, sw_batch_size, mode, sigma_scale, padding_mode,
            sw_dev, out_dev, progress, autocast_dtype,
        )
    # Outside inference mode, so that the caller gets an ordinary tensor it may edit in place.
    result = summed / weight_sum
    return result[(slice(None), slice(None), *crop)].contiguous()


def _pad_to_roi(
    inputs: torch.Tensor, roi: tuple[int, int, int], padding_mode: str
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """Pad every axis shorter than the window symmetrically up to it.

    Returns the padded inputs and the slices that crop the padding off again.
    """
    spatial = tuple(int(s) for s in inputs.shape[2:])
    pad_before = [max(r - s, 0) // 2 for s, r in zip(spatial, roi, strict=True)]
    pad_after = [max(r - s, 0) - b for s, r, b in zip(spatial, roi, pad_before, strict=True)]
    if any(pad_before) or any(pad_after):
        # F.pad lists the last axis first.
        pads = [p for axis in (2, 1, 0) for p in (pad_before[axis], pad_after[axis])]
        inputs = F.pad(inputs, pads, mode=padding_mode)
    crop = tuple(slice(b, b + s) for b, s in zip(pad_before, spatial, strict=True))
    return inputs, crop  # type: ignore[return-value]


def _windows(
    padded: tuple[int, ...], roi: tuple[int, int, int], overlap: float
) -> list[tuple[slice, slice, slice]]:
    """The window slices that tile a volume of spatial shape ``padded``."""
    starts = [window_starts(s, r, overlap) for s, r in zip(padded, roi, strict=True)]
    return [
        tuple(slice(st, st + r) for st, r in zip((x, y, z), roi, strict=True))  # type: ignore[misc]
        for x in starts[0]
        for y in starts[1]
        for z in starts[2]
    ]


def _check_prediction(
    out: object, window_batch: torch.Tensor, roi: tuple[int, int, int],
    summed: torch.Tensor | None,
) -> torch.Tensor:
    """Return the predictor's output after checking it is ``(n, K, *roi)`` with a fixed K."""
    if (
        not isinstance(out, torch.Tensor)
        or out.ndim != 5
        or out.shape[0] != window_batch.shape[0]
        or tuple(out.shape[2:]) != roi
    ):
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out)
        raise InvalidParameterError(
            f"the predictor must map (n, C, *roi) = {tuple(window_batch.shape)} to "
            f"(n, K, *roi), but returned {got}; make the network keep the spatial size "
            "(same padding) and return a single tensor"
        )
    if summed is not None and out.shape[1] != summed.shape[1]:
        raise InvalidParameterError(
            f"the predictor returned {out.shape[1]} channels after {summed.shape[1]} earlier; "
            "it must return the same number of channels for every window"
        )
    return out


def _accumulate(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    roi: tuple[int, int, int],
    overlap: float,
    sw_batch_size: int,
    mode: str,
    sigma_scale: float | Sequence[float],
    padding_mode: str,
    sw_dev: torch.device,
    out_dev: torch.device,
    progress: Callable[[int, int], object] | None,
    autocast_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[slice, slice, slice]]:
    """Weighted sum of window predictions and sum of weights, on the padded grid."""
    inputs, crop = _pad_to_roi(inputs, roi, padding_mode)
    padded = tuple(int(s) for s in inputs.shape[2:])
    windows = _windows(padded, roi, overlap)
    batch = int(inputs.shape[0])
    jobs = [(b, w) for b in range(batch) for w in windows]
    total = len(jobs)
    logger.debug(
        "sliding window: %d windows of %s per volume, %d volume(s), %d predictor call(s)",
        len(windows), roi, batch, -(-total // sw_batch_size),
    )

    summed: torch.Tensor | None = None
    importance: torch.Tensor | None = None
    acc_dtype = torch.float32
    for first in range(0, total, sw_batch_size):
        chunk = jobs[first : first + sw_batch_size]
        window_batch = torch.cat([inputs[b : b + 1, :, sx, sy, sz] for b, (sx, sy, sz) in chunk])
        window_batch = window_batch.to(sw_dev, non_blocking=True)
        with autocast(sw_dev, autocast_dtype):
            out = _check_prediction(predictor(window_batch), window_batch, roi, summed)
        if summed is None:
            if out.dtype == torch.float64:
                acc_dtype = torch.float64
            summed = torch.zeros(
                (batch, int(out.shape[1]), *padded), dtype=acc_dtype, device=out_dev
            )
            if mode == "gaussian":
                importance = gaussian_importance_map(
                    roi, sigma_scale, device=out_dev, dtype=acc_dtype
                )
        out = out.to(device=out_dev, dtype=acc_dtype)
        if importance is not None:
            out = out * importance
        for i, (b, (sx, sy, sz)) in enumerate(chunk):
            summed[b, :, sx, sy, sz] += out[i]
        if progress is not None:
            progress(first + len(chunk), total)

    assert summed is not None  # at least one window always exists
    weight_sum = torch.zeros((1, 1, *padded), dtype=acc_dtype, device=out_dev)
    window_weight = importance if importance is not None else 1.0
    for sx, sy, sz in windows:
        weight_sum[0, 0, sx, sy, sz] += window_weight
    return summed, weight_sum, crop
