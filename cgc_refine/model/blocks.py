"""Building blocks shared by the 3D networks.

The backbone of the paper (section 3.1 and 4.3: "After residual blocks and 3 times
down-sampling, we got embedding features z ...") is built from 3D residual blocks. This module
holds that block and the small factories that pick its normalisation and activation layers.

Every choice that depends on the configuration (which normalisation, whether the shortcut
needs a projection) is taken in the constructor, so ``forward`` runs the same operations
whatever the data: the blocks trace cleanly under :func:`torch.compile` and run under
``torch.autocast`` (bf16 or fp16) without special cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import torch
from torch import nn

from ..exceptions import InvalidParameterError

__all__ = [
    "NORM_TYPES",
    "ACT_TYPES",
    "make_norm",
    "make_act",
    "ResidualBlock3D",
]

#: Normalisation layers accepted by the ``norm`` argument of the blocks and networks.
NORM_TYPES: tuple[str, ...] = ("instance", "group", "batch")

#: Activations accepted by the ``act`` argument of the blocks and networks.
ACT_TYPES: tuple[str, ...] = ("leakyrelu", "relu")

_MAX_GROUPS = 8


def _check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an ``int``; raise ``InvalidParameterError`` unless a positive integer."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < 1:
        raise InvalidParameterError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Return the lower-cased ``value``; raise ``InvalidParameterError`` unless in ``choices``."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise InvalidParameterError(
            f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}."
        )
    return value.lower()


def _check_norm_act(norm: object, act: object) -> tuple[str, str]:
    """The normalisation and activation names of a block or network, checked and lower-cased."""
    return _check_choice(norm, "norm", NORM_TYPES), _check_choice(act, "act", ACT_TYPES)


def _check_stride(value: object) -> int | tuple[int, int, int]:
    """Validate a convolution stride: one positive int, or 3 positive ints (one per axis).

    An int is returned unchanged (so an isotropic block builds exactly the layers it always
    did); a sequence is returned as a tuple of 3 Python ints.
    """
    if isinstance(value, Integral) and not isinstance(value, bool):
        return _check_positive_int(value, "stride")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise InvalidParameterError(
            f"stride must be a positive integer or 3 positive integers (one per spatial axis), "
            f"got {value!r}."
        )
    s = tuple(_check_positive_int(v, f"stride[{i}]") for i, v in enumerate(value))
    return (s[0], s[1], s[2])


def _num_groups(channels: int) -> int:
    """Largest divisor of ``channels`` that is at most 8 (the number of GroupNorm groups)."""
    for groups in range(min(_MAX_GROUPS, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # pragma: no cover - the loop always returns for channels >= 1


def make_norm(norm: str, channels: int) -> nn.Module:
    """Create a 3D normalisation layer.

    Parameters
    ----------
    norm : {"instance", "group", "batch"}
        ``"instance"``: :class:`torch.nn.InstanceNorm3d` with learnable affine parameters;
        ``"group"``: :class:`torch.nn.GroupNorm` with the largest number of groups ``<= 8``
        that divides ``channels``; ``"batch"``: :class:`torch.nn.BatchNorm3d`.
    channels : int
        Number of feature channels to normalise.

    Returns
    -------
    torch.nn.Module
        The normalisation layer.

    Raises
    ------
    InvalidParameterError
        If ``norm`` is not a known type or ``channels`` is not a positive integer.
    """
    norm = _check_choice(norm, "norm", NORM_TYPES)
    channels = _check_positive_int(channels, "channels")
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    return nn.BatchNorm3d(channels)


def make_act(act: str) -> nn.Module:
    """Create an activation layer.

    Parameters
    ----------
    act : {"leakyrelu", "relu"}
        ``"leakyrelu"``: :class:`torch.nn.LeakyReLU` with negative slope 0.01;
        ``"relu"``: :class:`torch.nn.ReLU`.

    Returns
    -------
    torch.nn.Module
        The activation layer (never in-place, so it is safe under autograd and compile).

    Raises
    ------
    InvalidParameterError
        If ``act`` is not a known type.
    """
    act = _check_choice(act, "act", ACT_TYPES)
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    return nn.ReLU()


class ResidualBlock3D(nn.Module):
    """3D residual block: conv3-norm-act-conv3-norm, plus shortcut, then activation.

    ``y = act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))`` where ``conv1`` has stride
    ``stride`` (a strided block is how the backbone down-samples) and the shortcut is the
    identity when input and output shapes agree, otherwise a projection (1x1x1 convolution with
    the same stride followed by normalisation). The stride may differ per axis, e.g.
    ``(2, 2, 1)`` halves the in-plane axes and keeps the slices of thick-slice data (see
    :func:`cgc_refine.model.geometry.anisotropic_strides`).

    Parameters
    ----------
    in_ch : int
        Number of input channels.
    out_ch : int
        Number of output channels.
    stride : int or sequence of 3 int, optional
        Stride of the first 3x3x3 convolution and of the projected shortcut; ``2`` halves every
        (even) spatial dimension, ``(2, 2, 1)`` only the first two. Default 1.
    norm : {"instance", "group", "batch"}, optional
        Normalisation layer, see :func:`make_norm`. Default ``"instance"``.
    act : {"leakyrelu", "relu"}, optional
        Activation, see :func:`make_act`. Default ``"leakyrelu"``.

    Raises
    ------
    InvalidParameterError
        If a channel count or a stride is not a positive integer, or ``norm``/``act`` is
        unknown.

    Examples
    --------
    >>> block = ResidualBlock3D(4, 8, stride=2)
    >>> block(torch.zeros(1, 4, 8, 8, 4)).shape
    torch.Size([1, 8, 4, 4, 2])
    >>> ResidualBlock3D(4, 8, stride=(2, 2, 1))(torch.zeros(1, 4, 8, 8, 4)).shape
    torch.Size([1, 8, 4, 4, 4])
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int | Sequence[int] = 1,
        norm: str = "instance",
        act: str = "leakyrelu",
    ) -> None:
        super().__init__()
        in_ch = _check_positive_int(in_ch, "in_ch")
        out_ch = _check_positive_int(out_ch, "out_ch")
        stride = _check_stride(stride)
        norm, act = _check_norm_act(norm, act)
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.stride = stride

        # Convolutions followed by a normalisation need no bias (the norm re-centres anyway).
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_ch)
        self.act1 = make_act(act)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_ch)
        self.act2 = make_act(act)
        self.shortcut: nn.Module
        strided = stride != 1 if isinstance(stride, int) else any(s != 1 for s in stride)
        if strided or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False),
                make_norm(norm, out_ch),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(B, in_ch, X, Y, Z)``.

        The result has shape ``(B, out_ch, ceil(X/sx), ceil(Y/sy), ceil(Z/sz))``, with
        ``(sx, sy, sz)`` the per-axis stride: ``act(norm(conv(act(norm(conv(x))))) +
        shortcut(x))``.
        """
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))
