"""Tests of cgc_refine.model: residual blocks, the U-Net backbone, the CGC module and CGCUNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgc_refine.exceptions import CGCRefineError, InvalidImageError
from cgc_refine.model import (
    PATCH_SIZES,
    CGCLoss,
    CGCModule,
    CGCOutput,
    CGCUNet,
    CoarsePath,
    FinePath,
    InvalidGeometryError,
    PatchSupConLoss,
    ResidualBlock3D,
    ResidualUNet3D,
    anisotropic_strides,
    as_factor_triple,
    bottleneck_spacing,
    check_strides,
    clip_patch_size,
    downsample_factors,
    downsample_to,
    make_norm,
    masked_bce_with_logits,
    patch_lesion_labels,
    voxels_from_mm,
)

WIDTHS = (4, 8, 16, 32)
SMALL = (32, 32, 16)  # -> 4 x 4 x 2 bottleneck with 3 down-samplings


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(batch: int = 2, channels: int = 1, size: tuple[int, int, int] = SMALL) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(batch, channels, *size, generator=gen)


def _first_encoder_weight(net: CGCUNet | ResidualUNet3D) -> torch.Tensor:
    backbone = net.backbone if isinstance(net, CGCUNet) else net
    return backbone.stem.conv1.weight


# --------------------------------------------------------------------------- ResidualBlock3D


@pytest.mark.parametrize(
    ("in_ch", "out_ch", "stride", "expected", "identity_shortcut"),
    [
        (4, 4, 1, (2, 4, 8, 8, 4), True),
        (4, 8, 1, (2, 8, 8, 8, 4), False),
        (4, 4, 2, (2, 4, 4, 4, 2), False),
        (3, 8, 2, (2, 8, 4, 4, 2), False),
    ],
)
def test_residual_block_shapes_and_shortcut(in_ch, out_ch, stride, expected, identity_shortcut):
    block = ResidualBlock3D(in_ch, out_ch, stride=stride)
    out = block(torch.randn(2, in_ch, 8, 8, 4))
    assert tuple(out.shape) == expected
    assert isinstance(block.shortcut, nn.Identity) is identity_shortcut


@pytest.mark.parametrize(
    ("norm", "layer"),
    [("instance", nn.InstanceNorm3d), ("group", nn.GroupNorm), ("batch", nn.BatchNorm3d)],
)
def test_residual_block_norms(norm, layer):
    block = ResidualBlock3D(4, 6, norm=norm)
    assert isinstance(block.norm1, layer)
    out = block(torch.randn(2, 4, 4, 4, 4))
    assert out.shape == (2, 6, 4, 4, 4)
    assert torch.isfinite(out).all()


def test_group_norm_groups_divide_channels():
    assert make_norm("group", 12).num_groups == 6
    assert make_norm("group", 32).num_groups == 8
    assert make_norm("group", 7).num_groups == 7
    assert make_norm("group", 11).num_groups == 1


def test_residual_block_relu_output_nonnegative():
    block = ResidualBlock3D(2, 2, act="relu")
    assert (block(torch.randn(1, 2, 4, 4, 4)) >= 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_ch": 0, "out_ch": 4},
        {"in_ch": 4, "out_ch": -1},
        {"in_ch": 2.5, "out_ch": 4},
        {"in_ch": True, "out_ch": 4},
        {"in_ch": 4, "out_ch": 4, "stride": 0},
        {"in_ch": 4, "out_ch": 4, "norm": "layer"},
        {"in_ch": 4, "out_ch": 4, "norm": None},
        {"in_ch": 4, "out_ch": 4, "act": "gelu"},
    ],
)
def test_residual_block_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ResidualBlock3D(**kwargs)


# --------------------------------------------------------------------------- ResidualUNet3D


def test_unet_forward_and_encode_shapes():
    net = ResidualUNet3D(2, out_channels=3, channels=WIDTHS)
    x = _image(channels=2)
    z, skips = net.encode(x)
    assert tuple(z.shape) == (2, 32, 4, 4, 2)
    assert [tuple(s.shape) for s in skips] == [
        (2, 4, 32, 32, 16),
        (2, 8, 16, 16, 8),
        (2, 16, 8, 8, 4),
    ]
    logits = net.decode(z, skips)
    assert tuple(logits.shape) == (2, 3, *SMALL)
    torch.testing.assert_close(net(x), logits)
    assert net.downsample_factor == 8
    assert net.n_down == 3


def test_unet_paper_crop_gives_24x24x8_bottleneck():
    # Shape propagation on the meta device: no memory, no compute, real layer arithmetic.
    net = ResidualUNet3D(1, channels=WIDTHS).to("meta")
    x = torch.empty(2, 1, 192, 192, 64, device="meta")
    z, skips = net.encode(x)
    assert tuple(z.shape) == (2, 32, 24, 24, 8)
    assert z.device.type == "meta"  # the device follows the input
    assert net.bottleneck_size((192, 192, 64)) == (24, 24, 8)
    assert tuple(net.decode(z, skips).shape) == (2, 1, 192, 192, 64)


def test_unet_downsample_factor_follows_depth():
    net = ResidualUNet3D(1, channels=(4, 8))
    assert net.downsample_factor == 2
    z, _ = net.encode(torch.randn(1, 1, 6, 4, 2))
    assert tuple(z.shape[2:]) == (3, 2, 1)


@pytest.mark.parametrize("size", [(33, 32, 16), (32, 32, 12), (4, 32, 16)])
def test_unet_rejects_indivisible_input(size):
    net = ResidualUNet3D(1, channels=WIDTHS)
    with pytest.raises(InvalidImageError, match="multiple of 8"):
        net(torch.zeros(1, 1, *size))


@pytest.mark.parametrize("shape", [(1, 32, 32, 16), (1, 2, 32, 32, 16)])
def test_unet_rejects_bad_input_layout(shape):
    net = ResidualUNet3D(1, channels=WIDTHS)
    with pytest.raises(InvalidImageError):
        net(torch.zeros(*shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"in_channels": 1, "out_channels": 0},
        {"in_channels": 1, "channels": ()},
        {"in_channels": 1, "channels": (8,)},
        {"in_channels": 1, "channels": (4, 0, 8)},
        {"in_channels": 1, "channels": (4, -8)},
        {"in_channels": 1, "channels": "48"},
        {"in_channels": 1, "channels": 32},
        {"in_channels": 1, "norm": "foo"},
    ],
)
def test_unet_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ResidualUNet3D(**kwargs)


def test_unet_decode_checks_skip_count():
    net = ResidualUNet3D(1, channels=WIDTHS)
    z, skips = net.encode(_image())
    with pytest.raises(ValueError, match="3 skip"):
        net.decode(z, skips[1:])


# --------------------------------------------------------------------------- CGC paths


def test_coarse_path_outputs_and_fusion_formula():
    torch.manual_seed(0)
    path = CoarsePath(8)
    z = torch.randn(2, 8, 4, 4, 2)
    fused, logits = path(z)
    assert fused.shape == z.shape
    assert logits.shape == (2, 1, 4, 4, 2)
    p = torch.sigmoid(path.head(path.block(z)))
    expected = z + path.fuse(torch.cat([p * z, (1 - p) * z], dim=1))
    torch.testing.assert_close(fused, expected)
    assert not torch.allclose(fused, z)


def test_fine_path_embeddings_by_hand():
    torch.manual_seed(0)
    path = FinePath(8, patch_size=(3, 3, 2), proj_dim=5)
    z = torch.randn(2, 8, 7, 6, 4)  # grid 2 x 2 x 2; the 7th x-plane is dropped
    emb = path(z)
    assert emb.shape == (2, 8, 5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 8))
    h = path.proj(z)
    # patch (ix=1, iy=0, iz=1) -> index (1 * 2 + 0) * 2 + 1 = 5
    manual = h[:, :, 3:6, 0:3, 2:4].mean(dim=(2, 3, 4))
    torch.testing.assert_close(emb[:, 5], F.normalize(manual, dim=-1))


def test_fine_path_clips_patch_to_small_bottleneck():
    path = FinePath(4, patch_size=(6, 6, 4), proj_dim=3)
    emb = path(torch.randn(2, 4, 4, 4, 2))
    assert emb.shape == (2, 1, 3)
    assert path.effective_patch_size((4, 4, 2)) == (4, 4, 2)
    assert clip_patch_size((6, 6, 4), (24, 24, 8)) == (6, 6, 4)
    assert clip_patch_size((12, 12, 4), (8, 24, 2)) == (8, 12, 2)


@pytest.mark.parametrize(
    ("patch", "n_patches"), [((12, 12, 4), 8), ((6, 6, 4), 32), ((3, 3, 2), 256)]
)
def test_fine_path_patch_counts_on_paper_bottleneck(patch, n_patches):
    # 24 x 24 x 8 bottleneck of a 192 x 192 x 64 crop (section 4.3).
    assert patch in PATCH_SIZES
    path = FinePath(2, patch_size=patch, proj_dim=3)
    assert path(torch.randn(1, 2, 24, 24, 8)).shape == (1, n_patches, 3)


def test_patch_lesion_labels_rule_and_order():
    prior = torch.zeros(1, 1, 4, 4, 2)
    prior[0, 0, 0:2, 0:2, :] = 0.5  # patch 0: mean exactly 0.5 -> lesion (>=)
    prior[0, 0, 0:2, 2:4, :] = 0.49  # patch 1: mean 0.49 -> normal
    prior[0, 0, 2, 0, 0] = 1.0  # patch 2: one voxel in eight -> mean 0.125 -> normal
    prior[0, 0, 2:4, 2:4, :] = 1.0
    prior[0, 0, 3, 3, 1] = 0.0  # patch 3: mean 7/8 -> lesion
    labels = patch_lesion_labels(prior, (2, 2, 2))
    assert labels.dtype == torch.bool
    assert labels.tolist() == [[True, False, False, True]]
    assert patch_lesion_labels(prior, (2, 2, 2), threshold=0.1).tolist() == [
        [True, True, True, True]
    ]


def test_patch_lesion_labels_with_brain_mask():
    prior = torch.zeros(1, 1, 2, 2, 2)
    prior[0, 0, 0, :, :] = 1.0  # half the patch lesion -> mean 0.5 over all voxels
    prior[0, 0, 1, 0, 0] = 1.0  # -> 5/8 over all voxels
    brain = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    brain[0, 0, 1] = True  # brain voxels: the x=1 plane, whose prior mean is 1/4
    assert patch_lesion_labels(prior, (2, 2, 2)).tolist() == [[True]]
    assert patch_lesion_labels(prior, (2, 2, 2), brain_down=brain).tolist() == [[False]]
    assert patch_lesion_labels(prior, (2, 2, 2), brain, threshold=0.25).tolist() == [[True]]
    empty = torch.zeros_like(brain)
    assert patch_lesion_labels(prior, (2, 2, 2), empty, threshold=0.01).tolist() == [[False]]


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.2, True])
def test_patch_lesion_labels_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError):
        patch_lesion_labels(torch.zeros(1, 1, 2, 2, 2), (2, 2, 2), threshold=threshold)


def test_cgc_module_switches():
    z = torch.randn(2, 8, 4, 4, 2)
    off = CGCModule(8, use_coarse=False, use_fine=False)
    assert sum(p.numel() for p in off.parameters()) == 0
    out = off(z)
    assert out.features is z and out.coarse_logits is None and out.patch_embeddings is None
    assert out.patch_size is None

    coarse_only = CGCModule(8, use_fine=False)
    out = coarse_only(z)
    assert out.coarse_logits is not None and out.patch_embeddings is None
    assert coarse_only.fine is None and not torch.allclose(out.features, z)
    torch.testing.assert_close(coarse_only.fuse(z), out.features)

    fine_only = CGCModule(8, use_coarse=False, proj_dim=6)
    out = fine_only(z)
    assert out.features is z and out.coarse_logits is None
    assert out.patch_embeddings.shape == (2, 1, 6) and out.patch_size == (4, 4, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch_size": (6, 6)},
        {"patch_size": (6, 0, 4)},
        {"patch_size": (6, 6, 2.5)},
        {"patch_size": "664"},
        {"proj_dim": 0},
        {"use_coarse": "yes"},
        {"use_fine": 1},
        {"norm": "layer"},
    ],
)
def test_cgc_module_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CGCModule(8, **kwargs)


# --------------------------------------------------------------------------- CGCUNet


def test_cgcunet_forward_and_forward_train_shapes():
    torch.manual_seed(0)
    net = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    x = _image()
    logits = net(x)
    assert logits.shape == (2, 1, *SMALL)
    out = net.forward_train(x)
    assert isinstance(out, CGCOutput)
    torch.testing.assert_close(out.logits, logits)  # forward == forward_train logits
    assert out.coarse_logits.shape == (2, 1, 4, 4, 2)
    assert out.patch_embeddings.shape == (2, 1, 8)
    assert out.patch_size == (4, 4, 2)
    assert out.bottleneck_size == (4, 4, 2)
    assert net.downsample_factor == 8


def test_cgcunet_patch_size_selectable_on_larger_bottleneck():
    torch.manual_seed(0)
    net = CGCUNet(1, channels=(2, 4), patch_size=(3, 3, 2), proj_dim=4)  # factor 2
    out = net.forward_train(torch.randn(1, 1, 12, 12, 8))  # bottleneck 6 x 6 x 4
    assert out.patch_embeddings.shape == (1, 2 * 2 * 2, 4)
    assert out.patch_size == (3, 3, 2)


def test_cgcunet_with_both_paths_off_is_the_plain_backbone():
    x = _image()
    torch.manual_seed(7)
    plain = ResidualUNet3D(1, channels=WIDTHS)
    torch.manual_seed(7)
    ablated = CGCUNet(1, channels=WIDTHS, use_coarse=False, use_fine=False)
    plain_state = plain.state_dict()
    ablated_state = ablated.backbone.state_dict()
    assert plain_state.keys() == ablated_state.keys()
    for key in plain_state:
        assert torch.equal(plain_state[key], ablated_state[key]), key
    assert len(ablated.state_dict()) == len(plain_state)  # no extra parameter
    expected = plain(x)
    assert torch.equal(ablated(x), expected)
    out = ablated.forward_train(x)
    assert torch.equal(out.logits, expected)
    assert out.coarse_logits is None and out.patch_embeddings is None


def test_cgcunet_coarse_path_changes_output():
    x = _image()
    torch.manual_seed(7)
    plain = ResidualUNet3D(1, channels=WIDTHS)
    torch.manual_seed(7)
    full = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    assert not torch.allclose(full(x), plain(x))


def _grad_of_encoder(net: CGCUNet, loss: torch.Tensor) -> torch.Tensor:
    net.zero_grad(set_to_none=True)
    loss.backward()
    grad = _first_encoder_weight(net).grad
    assert grad is not None
    return grad


def test_gradient_reaches_encoder_from_each_aux_loss():
    torch.manual_seed(0)
    net = CGCUNet(1, channels=(4, 8), proj_dim=8, patch_size=(2, 2, 2))  # factor 2
    x = torch.randn(2, 1, 8, 8, 4)  # bottleneck 4 x 4 x 2 -> 4 patches per image

    out = net.forward_train(x)
    target = torch.rand_like(out.coarse_logits)
    grad = _grad_of_encoder(net, masked_bce_with_logits(out.coarse_logits, target))
    assert grad.abs().sum() > 0

    out = net.forward_train(x)
    labels = torch.tensor([[True, True, False, False], [True, False, False, True]])
    grad = _grad_of_encoder(net, PatchSupConLoss(0.2)(out.patch_embeddings, labels))
    assert grad.abs().sum() > 0
    # The contrastive loss trains the fine head, not the decoder head.
    assert net.backbone.head.weight.grad is None
    assert net.cgc.fine.proj[0].weight.grad.abs().sum() > 0

    out = net.forward_train(x)
    grad = _grad_of_encoder(net, masked_bce_with_logits(out.logits, torch.rand_like(out.logits)))
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"in_channels": 1, "channels": (4,)},
        {"in_channels": 1, "patch_size": (6, 6, 4, 1)},
        {"in_channels": 1, "patch_size": (0, 6, 4)},
        {"in_channels": 1, "proj_dim": -3},
        {"in_channels": 1, "norm": "weird"},
        {"in_channels": 1, "use_fine": None},
    ],
)
def test_cgcunet_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CGCUNet(channels=kwargs.pop("channels", WIDTHS), **kwargs)


def test_cgcunet_rejects_indivisible_input():
    net = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    with pytest.raises(InvalidImageError, match="multiple of 8"):
        net.forward_train(torch.zeros(1, 1, 36, 32, 16))


def test_cgcunet_is_deterministic_for_a_seed():
    x = _image()
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        net = CGCUNet(1, channels=WIDTHS, proj_dim=8)
        out = net.forward_train(x)
        outputs.append(out)
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    assert torch.equal(outputs[0].patch_embeddings, outputs[1].patch_embeddings)
    torch.manual_seed(4)
    other = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    assert not torch.allclose(other(x), outputs[0].logits)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_cgcunet_other_norms_train_step(norm):
    torch.manual_seed(0)
    net = CGCUNet(1, channels=WIDTHS, proj_dim=8, norm=norm)
    out = net.forward_train(_image())
    out.logits.mean().backward()
    assert torch.isfinite(_first_encoder_weight(net).grad).all()


def test_cgcunet_runs_under_bf16_autocast():
    torch.manual_seed(0)
    net = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    x = _image()
    reference = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward_train(x)
    assert torch.isfinite(out.logits.float()).all()
    assert torch.isfinite(out.patch_embeddings.float()).all()
    torch.testing.assert_close(out.logits.float(), reference, atol=0.15, rtol=0.1)


def test_cgcunet_device_follows_input():
    net = CGCUNet(1, channels=WIDTHS, proj_dim=8).to("meta")
    out = net.forward_train(torch.empty(1, 1, *SMALL, device="meta"))
    assert out.logits.device.type == "meta"
    assert out.patch_embeddings.device.type == "meta"


# --------------------------------------------------------------------------- anisotropic geometry
# Issue 10, item 7 / finding 5: on thick-slice data (WMH, 0.47 x 0.47 x 8 mm) isotropic pooling
# makes one bottleneck voxel 3.76 x 3.76 x 64 mm, and both CGC paths lose the lesions.

WMH_SPACING = (0.47, 0.47, 8.0)
WMH_WIDTHS = (8, 16, 32, 64)
WMH_CROP = (64, 64, 16)


@pytest.mark.parametrize(
    ("spacing", "n_down", "expected"),
    [
        # isotropic: every axis halved at every level (the paper's layout)
        ((1.0, 1.0, 1.0), 3, ((2, 2, 2),) * 3),
        # WMH: in-plane 0.47 -> 0.94 -> 1.88 -> 3.76 mm, each time 8 > 2 x finest: z kept
        ((0.47, 0.47, 8.0), 3, ((2, 2, 1),) * 3),
        # 1 x 1 x 3: 3 > 2 x 1 -> (2,2,1); then (2,2,3): 3 <= 4 -> (2,2,2); (4,4,6): 6 <= 8
        ((1.0, 1.0, 3.0), 3, ((2, 2, 1), (2, 2, 2), (2, 2, 2))),
        # the rule follows the axis, not the position: thick y
        ((1.0, 3.0, 1.0), 3, ((2, 1, 2), (2, 2, 2), (2, 2, 2))),
        # boundary: 2 <= 2 x 1 is pooled at once; 2.01 > 2 waits one level
        ((1.0, 1.0, 2.0), 2, ((2, 2, 2), (2, 2, 2))),
        ((1.0, 1.0, 2.01), 2, ((2, 2, 1), (2, 2, 2))),
        # (.5,.5,5) -> (1,1,5) -> (2,2,5) -> (4,4,5) [5 <= 8] -> (8,8,10) [10 <= 16]
        ((0.5, 0.5, 5.0), 5, ((2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))),
        # three different spacings: 1, 2.5, 4 -> z waits one level longer than y
        # (1, 2.5, 4): 2.5 > 2, 4 > 2 -> (2,1,1); (2, 2.5, 4): (2,2,2) [4 <= 4]
        ((1.0, 2.5, 4.0), 2, ((2, 1, 1), (2, 2, 2))),
        ((1.0, 1.0, 1.0), 0, ()),
    ],
)
def test_anisotropic_strides_hand_computed(spacing, n_down, expected):
    assert anisotropic_strides(spacing, n_down) == expected


def test_anisotropic_strides_ratio_and_float32_spacing():
    # A larger ratio pools the thick axis earlier: 3 <= 3 x 1.
    assert anisotropic_strides((1.0, 1.0, 3.0), 2, ratio=3.0) == ((2, 2, 2), (2, 2, 2))
    # Spacings recovered from a (rotated) float32 affine are off in the last digits: 1 x 1 x 2 mm
    # may come back as the float32 neighbours below, whose ratio is a hair above 2. The
    # relative tolerance keeps such a pair on the "pool" side.
    one = np.nextafter(np.float32(1.0), np.float32(0.0))
    two = np.nextafter(np.float32(2.0), np.float32(3.0))
    spacing = np.array([one, one, two], dtype=np.float32)
    assert float(spacing[2]) > 2 * float(spacing[0])
    assert anisotropic_strides(spacing, 1) == ((2, 2, 2),)
    # ... but a real 1 % excess is not rounding
    assert anisotropic_strides((1.0, 1.0, 2.02), 1) == ((2, 2, 1),)


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0), (1.0, 1.0, 0.0), (1.0, -1.0, 1.0), (1.0, float("nan"), 1.0), "111", 1.0,
     (True, 1.0, 1.0)],
)
def test_anisotropic_strides_rejects_bad_spacing(spacing):
    with pytest.raises(InvalidGeometryError, match="spacing"):
        anisotropic_strides(spacing, 3)


@pytest.mark.parametrize(("n_down", "ratio"), [(-1, 2.0), (2.0, 2.0), (3, 0.5), (3, float("inf"))])
def test_anisotropic_strides_rejects_bad_levels_and_ratio(n_down, ratio):
    with pytest.raises(ValueError):
        anisotropic_strides((1.0, 1.0, 1.0), n_down, ratio=ratio)


def test_downsample_factors_and_bottleneck_spacing():
    assert downsample_factors(((2, 2, 1), (2, 2, 1), (2, 2, 2))) == (8, 8, 2)
    assert downsample_factors([[2, 2, 2]] * 3) == (8, 8, 8)
    assert downsample_factors(()) == (1, 1, 1)
    wmh = anisotropic_strides(WMH_SPACING, 3)
    assert downsample_factors(wmh) == (8, 8, 1)
    sx, sy, sz = bottleneck_spacing(WMH_SPACING, wmh)
    assert (sx, sy, sz) == pytest.approx((3.76, 3.76, 8.0))
    # the isotropic network's bottleneck voxel on the same data: the 64 mm slab of finding 5
    assert bottleneck_spacing(WMH_SPACING, [[2, 2, 2]] * 3)[2] == pytest.approx(64.0)
    with pytest.raises(InvalidGeometryError):
        downsample_factors([(2, 2)])


def test_as_factor_triple_and_voxels_from_mm():
    assert as_factor_triple(8) == (8, 8, 8)
    assert as_factor_triple([8, 8, 1]) == (8, 8, 1)
    for bad in (0, (8, 8), (8, 0, 1), True, "8", 2.0):
        with pytest.raises(InvalidGeometryError):
            as_factor_triple(bad)
    # 60 mm / (0.47 mm x 8) = 15.96 -> 16 x 8 = 128; 128 mm / 8 mm = 16 slices
    assert voxels_from_mm((60.0, 60.0, 128.0), WMH_SPACING, (8, 8, 1)) == (128, 128, 16)
    # never below one multiple
    assert voxels_from_mm((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), 8) == (8, 8, 8)


@pytest.mark.parametrize(
    "strides",
    [
        [(2, 2, 2)] * 2,  # too few levels
        [(2, 2, 2)] * 4,  # too many
        [(2, 2, 3), (2, 2, 2), (2, 2, 2)],  # not 1 or 2
        [(2, 2, 0), (2, 2, 2), (2, 2, 2)],
        [(2, 2), (2, 2, 2), (2, 2, 2)],
        [(1, 1, 1), (2, 2, 2), (2, 2, 2)],  # a level that does not down-sample
        [(2.0, 2, 2), (2, 2, 2), (2, 2, 2)],
        [(True, 2, 2), (2, 2, 2), (2, 2, 2)],
        "222",
        2,
    ],
)
def test_unet_rejects_bad_strides(strides):
    with pytest.raises(InvalidGeometryError, match=r"strides") as info:
        ResidualUNet3D(1, channels=WIDTHS, strides=strides)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, CGCRefineError)
    with pytest.raises(InvalidGeometryError):
        CGCUNet(1, channels=WIDTHS, strides=strides)


def test_check_strides_accepts_lists_and_arrays():
    expected = ((2, 2, 1), (2, 2, 2))
    assert check_strides([[2, 2, 1], [2, 2, 2]], 2) == expected
    assert check_strides(np.array([[2, 2, 1], [2, 2, 2]]), 2) == expected


def test_residual_block_per_axis_stride():
    block = ResidualBlock3D(4, 8, stride=(2, 2, 1))
    out = block(torch.randn(2, 4, 8, 8, 4))
    assert tuple(out.shape) == (2, 8, 4, 4, 4)
    assert block.conv1.stride == (2, 2, 1)
    assert block.shortcut[0].stride == (2, 2, 1)
    # a per-axis stride of ones with equal widths keeps the identity shortcut
    assert isinstance(ResidualBlock3D(4, 4, stride=(1, 1, 1)).shortcut, nn.Identity)
    for bad in ((2, 2), (2, 0, 1), "221"):
        with pytest.raises(ValueError):
            ResidualBlock3D(4, 4, stride=bad)


def test_unet_thick_slice_bottleneck_shape():
    strides = anisotropic_strides(WMH_SPACING, len(WMH_WIDTHS) - 1)
    net = ResidualUNet3D(1, channels=WMH_WIDTHS, strides=strides)
    x = torch.randn(2, 1, *WMH_CROP, generator=torch.Generator().manual_seed(3))
    z, skips = net.encode(x)
    assert tuple(z.shape) == (2, 64, 8, 8, 16)
    assert [tuple(s.shape[2:]) for s in skips] == [(64, 64, 16), (32, 32, 16), (16, 16, 16)]
    assert net.bottleneck_size(WMH_CROP) == (8, 8, 16)
    assert net.downsample_factors == (8, 8, 1)
    assert net.downsample_factor == 8  # a size that is a multiple of 8 on every axis is fine
    assert not net.isotropic
    assert tuple(net(x).shape) == (2, 1, *WMH_CROP)
    # the decoder undoes each level's own stride
    assert [tuple(up.kernel_size) for up in net.up] == [(2, 2, 1)] * 3
    assert [tuple(up.stride) for up in net.up] == [(2, 2, 1)] * 3


def test_unet_mixed_strides_decode_back_to_input_size():
    strides = anisotropic_strides((1.0, 1.0, 3.0), 3)  # ((2,2,1), (2,2,2), (2,2,2))
    net = ResidualUNet3D(1, channels=WIDTHS, strides=strides)
    assert net.downsample_factors == (8, 8, 4)
    x = torch.randn(1, 1, 16, 16, 8)
    z, _ = net.encode(x)
    assert tuple(z.shape[2:]) == (2, 2, 2)
    assert tuple(net(x).shape) == (1, 1, 16, 16, 8)


def test_unet_anisotropic_input_check_uses_per_axis_factors():
    net = ResidualUNet3D(1, channels=WIDTHS, strides=[(2, 2, 1)] * 3)
    # 3 slices are fine: the slice axis is never pooled ...
    assert tuple(net(torch.zeros(1, 1, 16, 16, 3)).shape) == (1, 1, 16, 16, 3)
    assert net.bottleneck_size((16, 24, 3)) == (2, 3, 3)
    # ... but the in-plane axes must still be multiples of 8, and the message says so
    with pytest.raises(InvalidImageError, match=r"\(8, 8, 1\)"):
        net(torch.zeros(1, 1, 20, 16, 3))
    with pytest.raises(InvalidImageError):
        net.bottleneck_size((16, 16, 0))


def test_unet_strides_attribute_is_checkpoint_friendly():
    iso = ResidualUNet3D(1, channels=WIDTHS)
    assert iso.strides == [[2, 2, 2]] * 3
    thick = CGCUNet(1, channels=WIDTHS, proj_dim=8, strides=((2, 2, 1),) * 3)
    assert thick.strides == [[2, 2, 1]] * 3
    assert thick.downsample_factors == (8, 8, 1)
    assert json.loads(json.dumps(thick.strides)) == thick.strides  # plain lists of ints
    # a network rebuilt from the stored strides takes the stored weights
    rebuilt = CGCUNet(1, channels=WIDTHS, proj_dim=8, strides=json.loads(json.dumps(thick.strides)))
    rebuilt.load_state_dict(thick.state_dict(), strict=True)
    x = torch.randn(1, 1, 16, 16, 4)
    torch.testing.assert_close(rebuilt(x), thick(x))
    # ... and an isotropic network does not
    with pytest.raises(RuntimeError):
        CGCUNet(1, channels=WIDTHS, proj_dim=8).load_state_dict(thick.state_dict())


# Parameter shapes of the isotropic default (WIDTHS, 1 input channel), written out by hand so
# that a change of the default layout cannot pass unnoticed.
_ISOTROPIC_SHAPES = {
    "stem.conv1.weight": (4, 1, 3, 3, 3),
    "down.0.conv1.weight": (8, 4, 3, 3, 3),
    "down.0.shortcut.0.weight": (8, 4, 1, 1, 1),
    "down.1.conv1.weight": (16, 8, 3, 3, 3),
    "down.2.conv1.weight": (32, 16, 3, 3, 3),
    "down.2.conv2.weight": (32, 32, 3, 3, 3),
    "up.0.weight": (32, 16, 2, 2, 2),
    "up.0.bias": (16,),
    "up.1.weight": (16, 8, 2, 2, 2),
    "up.2.weight": (8, 4, 2, 2, 2),
    "dec.0.conv1.weight": (16, 32, 3, 3, 3),
    "dec.2.conv1.weight": (4, 8, 3, 3, 3),
    "head.weight": (1, 4, 1, 1, 1),
}


@pytest.mark.parametrize("strides", [None, [(2, 2, 2)] * 3])
def test_unet_isotropic_default_layout_unchanged(strides):
    net = ResidualUNet3D(1, channels=WIDTHS, strides=strides)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for name, shape in _ISOTROPIC_SHAPES.items():
        assert shapes[name] == shape, name
    assert net.downsample_factor == 8 and net.downsample_factors == (8, 8, 8)
    assert net.isotropic
    assert all(block.conv1.stride == (2, 2, 2) for block in net.down)
    assert all(up.kernel_size == (2, 2, 2) and up.stride == (2, 2, 2) for up in net.up)


def test_explicit_isotropic_strides_equal_the_default():
    torch.manual_seed(5)
    default = CGCUNet(1, channels=WIDTHS, proj_dim=8)
    torch.manual_seed(5)
    explicit = CGCUNet(1, channels=WIDTHS, proj_dim=8, strides=[[2, 2, 2]] * 3)
    ref, other = default.state_dict(), explicit.state_dict()
    assert list(ref) == list(other)
    assert all(torch.equal(ref[k], other[k]) for k in ref)
    x = _image()
    assert torch.equal(default(x), explicit(x))


def test_anisotropic_layout_changes_only_the_decoder_kernels():
    iso = ResidualUNet3D(1, channels=WIDTHS)
    thick = ResidualUNet3D(1, channels=WIDTHS, strides=[(2, 2, 1)] * 3)
    a = {k: tuple(v.shape) for k, v in iso.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in thick.state_dict().items()}
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    assert differ == {"up.0.weight", "up.1.weight", "up.2.weight"}
    assert b["up.0.weight"] == (32, 16, 2, 2, 1)


def _thick_slice_net(strides, seed: int = 0) -> CGCUNet:
    torch.manual_seed(seed)
    return CGCUNet(1, channels=WMH_WIDTHS, proj_dim=8, patch_size=(1, 1, 1), strides=strides)


def test_cgcunet_thick_slice_forward_and_forward_train():
    net = _thick_slice_net(anisotropic_strides(WMH_SPACING, 3))
    x = torch.randn(2, 1, *WMH_CROP, generator=torch.Generator().manual_seed(4))
    assert tuple(net(x).shape) == (2, 1, *WMH_CROP)
    out = net.forward_train(x)
    assert tuple(out.logits.shape) == (2, 1, *WMH_CROP)
    assert out.bottleneck_size == (8, 8, 16)
    assert tuple(out.coarse_logits.shape) == (2, 1, 8, 8, 16)
    assert tuple(out.patch_embeddings.shape) == (2, 8 * 8 * 16, 8)
    assert out.patch_size == (1, 1, 1)


def _thick_slice_phantom() -> torch.Tensor:
    """64 x 64 x 16 prior with one 10 x 10 x 3 lesion (e.g. a WMH lesion of 4.7 x 4.7 x 24 mm).

    In-plane the blob spans 28..37, so the 8-voxel block 32..39 holds 6 x 6 of it; along z it
    spans slices 6..8, which the isotropic network's 8-slice blocks split 2 + 1.
    """
    prior = torch.zeros(1, 1, *WMH_CROP)
    prior[..., 28:38, 28:38, 6:9] = 1.0
    return prior


def test_thick_slice_phantom_gives_lesion_patches_only_with_anisotropic_strides():
    prior = _thick_slice_phantom()
    x = prior + 0.1 * torch.randn(prior.shape, generator=torch.Generator().manual_seed(6))
    results = {}
    for name, strides in (("iso", None), ("aniso", anisotropic_strides(WMH_SPACING, 3))):
        out = _thick_slice_net(strides).forward_train(x)
        prior_down = downsample_to(prior, out.bottleneck_size)
        labels = patch_lesion_labels(prior_down, out.patch_size)
        _, parts = CGCLoss()(out, prior)
        results[name] = (prior_down.max().item(), int(labels.sum()), parts["fine"].item())
    iso_max, iso_pos, iso_fine = results["iso"]
    aniso_max, aniso_pos, aniso_fine = results["aniso"]
    # isotropic: a bottleneck voxel holds lesion on at most 2 of its 8 slices -> no coarse
    # target reaches 0.5, no lesion patch, and the fine loss is off
    assert iso_max == pytest.approx(36 / 64 * 2 / 8)
    assert iso_pos == 0 and iso_fine == 0.0
    # anisotropic: 6 x 6 / 64 of the block on each of the 3 lesion slices
    assert aniso_max == pytest.approx(36 / 64)
    assert aniso_pos == 3
    assert aniso_fine > 0.0


def test_thick_slice_gradients_reach_every_parameter():
    net = _thick_slice_net(anisotropic_strides(WMH_SPACING, 3))
    prior = _thick_slice_phantom().repeat(2, 1, 1, 1, 1)
    prior[1] = prior[1].flip(1)  # a second lesion position
    x = prior + 0.1 * torch.randn(prior.shape, generator=torch.Generator().manual_seed(7))
    total, parts = CGCLoss()(net.forward_train(x), prior)
    assert parts["fine"] > 0 and parts["coarse"] > 0
    total.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert _first_encoder_weight(net).grad.abs().sum() > 0
    assert net.cgc.fine.proj[0].weight.grad.abs().sum() > 0
