"""Tests of cgc_refine.model: residual blocks, the U-Net backbone, the CGC module and CGCUNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgc_refine.exceptions import InvalidImageError
from cgc_refine.model import (
    PATCH_SIZES,
    CGCModule,
    CGCOutput,
    CGCUNet,
    CoarsePath,
    FinePath,
    PatchSupConLoss,
    ResidualBlock3D,
    ResidualUNet3D,
    clip_patch_size,
    make_norm,
    masked_bce_with_logits,
    patch_lesion_labels,
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
