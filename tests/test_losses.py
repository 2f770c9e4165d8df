"""Tests of cgc_refine.model.losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cgc_refine.exceptions import SpaceMismatchError
from cgc_refine.model import (
    CGCLoss,
    CGCOutput,
    CGCUNet,
    PatchSupConLoss,
    downsample_mask,
    downsample_to,
    masked_bce_with_logits,
    patch_lesion_labels,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(logit: float, target: float) -> float:
    p = _sigmoid(logit)
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


# --------------------------------------------------------------------------- masked BCE


def test_masked_bce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0], requires_grad=True)
    target = torch.tensor([0.5, 1.0, 0.2, 0.0])
    mask = torch.tensor([True, True, False, True])
    expected_masked = (_bce(0.0, 0.5) + _bce(2.0, 1.0) + _bce(3.0, 0.0)) / 3
    expected_all = (_bce(0.0, 0.5) + _bce(2.0, 1.0) + _bce(-1.0, 0.2) + _bce(3.0, 0.0)) / 4
    got = masked_bce_with_logits(logits, target, mask)
    assert got.item() == pytest.approx(expected_masked, rel=1e-6)
    assert masked_bce_with_logits(logits, target).item() == pytest.approx(expected_all, rel=1e-6)
    got.backward()
    assert logits.grad[2].item() == 0.0  # the masked-out voxel gets no gradient
    # d/ds BCE = sigmoid(s) - y, divided by the 3 voxels of the mask
    assert logits.grad[1].item() == pytest.approx((_sigmoid(2.0) - 1.0) / 3, rel=1e-5)


def test_masked_bce_accepts_numeric_mask_and_5d_tensors():
    logits = torch.tensor([1.0, -2.0]).view(1, 1, 2, 1, 1)
    target = torch.tensor([0.3, 0.9]).view(1, 1, 2, 1, 1)
    mask = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1)
    got = masked_bce_with_logits(logits, target, mask)
    assert got.item() == pytest.approx(_bce(-2.0, 0.9), rel=1e-6)


def test_masked_bce_empty_mask_is_zero_with_grad():
    logits = torch.randn(2, 3, requires_grad=True)
    got = masked_bce_with_logits(logits, torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert got.item() == 0.0
    assert got.requires_grad
    got.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_masked_bce_is_stable_for_large_logits():
    logits = torch.tensor([200.0, -200.0, 200.0, -200.0], requires_grad=True)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0])
    got = masked_bce_with_logits(logits, target)
    assert got.item() == pytest.approx((200.0 + 200.0) / 4, rel=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all()


def test_masked_bce_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="target shape"):
        masked_bce_with_logits(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="mask shape"):
        masked_bce_with_logits(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3).bool())


# --------------------------------------------------------------------------- down-sampling


def test_downsample_to_averages_blocks():
    prior = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 2, 2)
    out = downsample_to(prior, (2, 1, 1))
    assert out.shape == (1, 1, 2, 1, 1)
    # first block: values 0..7 (x = 0, 1), second: 8..15
    assert out.flatten().tolist() == [3.5, 11.5]
    assert torch.equal(downsample_to(prior, (4, 2, 2)), prior)


def test_downsample_to_rejects_indivisible_size():
    with pytest.raises(ValueError, match="multiple"):
        downsample_to(torch.zeros(1, 1, 6, 4, 4), (4, 2, 2))
    with pytest.raises(ValueError):
        downsample_to(torch.zeros(1, 6, 4, 4), (3, 2, 2))
    with pytest.raises(ValueError):
        downsample_to(torch.zeros(1, 1, 6, 4, 4), (3, 2))


def test_downsample_mask_majority():
    mask = torch.zeros(1, 1, 2, 2, 6, dtype=torch.bool)
    mask[..., 0:2] = True  # block 0: 8/8 inside
    mask[0, 0, :, 0, 2:4] = True  # block 1: 4/8 = 0.5, not > 0.5
    mask[0, 0, :, :, 4] = True
    mask[0, 0, 0, 0, 5] = True  # block 2: 5/8
    assert downsample_mask(mask, (1, 1, 3)).flatten().tolist() == [True, False, True]


# --------------------------------------------------------------------------- PatchSupConLoss


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Four 2-D unit embeddings at 0, 60, 90 and 180 degrees: cos(i, j) = cos(angle difference).
ANGLES = (0.0, 60.0, 90.0, 180.0)
EMB = torch.tensor([_unit(a) for a in ANGLES])


def _cos(i: int, j: int) -> float:
    return math.cos(math.radians(ANGLES[i] - ANGLES[j]))


def _anchor_term(i: int, positives: list[int], tau: float) -> float:
    """-1/|P| sum_p log(exp(cos(i,p)/tau) / sum_{a != i} exp(cos(i,a)/tau)), written out."""
    denominator = sum(math.exp(_cos(i, a) / tau) for a in range(len(ANGLES)) if a != i)
    total = 0.0
    for p in positives:
        total += math.log(math.exp(_cos(i, p) / tau) / denominator)
    return -total / len(positives)


def test_supcon_two_lesion_patches_by_hand():
    tau = 0.2
    labels = torch.tensor([True, True, False, False])
    # anchor 0: positive 1; anchor 1: positive 0. Normal patches are not anchors.
    # cosines: (0,1) = 0.5, (0,2) = 0, (0,3) = -1, (1,2) = cos 30, (1,3) = cos 120
    d0 = math.exp(0.5 / tau) + math.exp(0.0 / tau) + math.exp(-1.0 / tau)
    d1 = math.exp(0.5 / tau) + math.exp(math.sqrt(3) / 2 / tau) + math.exp(-0.5 / tau)
    l0 = -math.log(math.exp(0.5 / tau) / d0)
    l1 = -math.log(math.exp(0.5 / tau) / d1)
    expected = (l0 + l1) / 2
    got = PatchSupConLoss(temperature=tau)(EMB, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.dtype == torch.float32


def test_supcon_three_lesion_patches_averages_over_positives():
    tau = 0.5
    labels = torch.tensor([True, True, True, False])
    expected = (
        _anchor_term(0, [1, 2], tau) + _anchor_term(1, [0, 2], tau) + _anchor_term(2, [0, 1], tau)
    ) / 3
    got = PatchSupConLoss(temperature=tau)(EMB, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_all_anchors_by_hand():
    tau = 0.2
    labels = torch.tensor([True, True, False, False])
    expected = (
        _anchor_term(0, [1], tau)
        + _anchor_term(1, [0], tau)
        + _anchor_term(2, [3], tau)
        + _anchor_term(3, [2], tau)
    ) / 4
    got = PatchSupConLoss(temperature=tau, anchors="all")(EMB, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    lesion_only = PatchSupConLoss(temperature=tau)(EMB, labels)
    assert got.item() != pytest.approx(lesion_only.item(), rel=1e-3)


def test_supcon_is_invariant_to_embedding_scale():
    labels = torch.tensor([True, True, False, False])
    scales = torch.tensor([[3.0], [0.01], [250.0], [7.5]])
    loss = PatchSupConLoss(0.2)
    torch.testing.assert_close(loss(EMB * scales, labels), loss(EMB, labels))


def test_supcon_contrasts_across_the_batch():
    torch.manual_seed(0)
    emb = torch.randn(2, 5, 8)
    labels = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    loss = PatchSupConLoss(0.2)
    torch.testing.assert_close(loss(emb, labels), loss(emb.reshape(10, 8), labels.reshape(10)))
    # Contrasting per image would give a different value.
    per_image = (loss(emb[0], labels[0]) + loss(emb[1], labels[1])) / 2
    assert not torch.allclose(loss(emb, labels), per_image)


def test_supcon_mask_removes_patches():
    torch.manual_seed(0)
    emb = torch.randn(6, 4)
    labels = torch.tensor([True, True, False, True, False, False])
    keep = torch.tensor([True, True, True, False, True, False])
    loss = PatchSupConLoss(0.3)
    torch.testing.assert_close(loss(emb, labels, keep), loss(emb[keep], labels[keep]))


def test_supcon_no_nan_at_low_temperature_and_large_values():
    torch.manual_seed(0)
    emb = (torch.randn(16, 32) * 1e4).to(torch.bfloat16).requires_grad_(True)
    emb_dup = torch.cat([emb, emb[:4]])  # exact duplicates: cosine 1 with the anchor's twin
    labels = torch.tensor([True, False] * 8 + [True] * 4)
    for tau in (0.07, 0.01):
        got = PatchSupConLoss(temperature=tau)(emb_dup, labels)
        assert torch.isfinite(got)
        (grad,) = torch.autograd.grad(got, emb)
        assert torch.isfinite(grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = PatchSupConLoss(temperature=0.07)(emb_dup, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got)


def test_supcon_without_positive_is_zero_with_grad():
    emb = EMB.clone().requires_grad_(True)
    loss = PatchSupConLoss(0.2)
    for labels in (
        torch.tensor([True, False, False, False]),  # one lesion patch: no positive
        torch.tensor([False, False, False, False]),  # no lesion patch
    ):
        got = loss(emb, labels)
        assert got.item() == 0.0 and not math.copysign(1.0, got.item()) < 0
        assert got.requires_grad
        (grad,) = torch.autograd.grad(got, emb)
        assert torch.equal(grad, torch.zeros_like(emb))
    # With anchors="all" the normal patches still have positives: not zero.
    assert PatchSupConLoss(0.2, anchors="all")(emb, torch.tensor([True, False, False, False])) > 0


def test_supcon_single_patch_is_zero():
    got = PatchSupConLoss()(torch.randn(1, 4, requires_grad=True), torch.tensor([True]))
    assert got.item() == 0.0 and got.requires_grad


def test_supcon_gradient_pulls_positives_together():
    emb = EMB.clone().requires_grad_(True)
    labels = torch.tensor([True, True, False, False])
    optimiser = torch.optim.SGD([emb], lr=0.05)
    loss = PatchSupConLoss(0.2)
    before = loss(emb, labels).item()
    for _ in range(5):
        optimiser.zero_grad()
        loss(emb, labels).backward()
        optimiser.step()
    assert loss(emb, labels).item() < before
    cos01 = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    assert cos01 > 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": "0.2"},
        {"anchors": "normal"},
        {"anchors": None},
    ],
)
def test_supcon_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        PatchSupConLoss(**kwargs)


@pytest.mark.parametrize(
    ("emb_shape", "label_shape"),
    [((4, 2), (3,)), ((2, 3, 4), (6,)), ((4,), (4,)), ((1, 2, 3, 4), (1, 2, 3))],
)
def test_supcon_rejects_bad_shapes(emb_shape, label_shape):
    with pytest.raises(ValueError):
        PatchSupConLoss()(torch.randn(*emb_shape), torch.zeros(label_shape, dtype=torch.bool))


# --------------------------------------------------------------------------- CGCLoss


def _hand_output() -> tuple[CGCOutput, torch.Tensor, torch.Tensor]:
    """Full grid 4x4x2, bottleneck 2x2x1 (factor 2), patches of 1x1x1: 4 per image."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 4, 4, 2, requires_grad=True)
    coarse = torch.randn(1, 1, 2, 2, 1, requires_grad=True)
    emb = torch.randn(1, 4, 3, requires_grad=True)
    out = CGCOutput(logits, coarse, emb, patch_size=(1, 1, 1), bottleneck_size=(2, 2, 1))
    prior = torch.zeros(1, 1, 4, 4, 2)
    prior[0, 0, 0:2, 0:4, :] = 0.9  # bottleneck cells (0, 0) and (0, 1): lesion
    prior[0, 0, 2:4, 0:2, :] = 0.4  # cell (1, 0): 0.4 -> normal
    brain = torch.ones(1, 1, 4, 4, 2, dtype=torch.bool)
    return out, prior, brain


def test_cgc_loss_combines_terms_with_lambdas():
    out, prior, _ = _hand_output()
    loss = CGCLoss(lambda_cg=0.5, lambda_fg=2.0, temperature=0.3)
    total, parts = loss(out, prior)

    bce = masked_bce_with_logits(out.logits, prior)
    prior_down = downsample_to(prior, (2, 2, 1))
    assert prior_down.flatten().tolist() == pytest.approx([0.9, 0.9, 0.4, 0.0])
    coarse = masked_bce_with_logits(out.coarse_logits, prior_down)
    labels = torch.tensor([[True, True, False, False]])
    assert torch.equal(patch_lesion_labels(prior_down, (1, 1, 1)), labels)
    fine = PatchSupConLoss(0.3)(out.patch_embeddings, labels)

    assert parts["bce"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert parts["coarse"].item() == pytest.approx(coarse.item(), rel=1e-6)
    assert parts["fine"].item() == pytest.approx(fine.item(), rel=1e-6)
    expected = bce.item() + 0.5 * coarse.item() + 2.0 * fine.item()
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert parts["total"].item() == pytest.approx(expected, rel=1e-6)
    assert all(not v.requires_grad for v in parts.values())
    assert fine.item() > 0 and coarse.item() > 0

    total.backward()
    for tensor in (out.logits, out.coarse_logits, out.patch_embeddings):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_cgc_loss_coarse_term_by_hand():
    coarse = torch.tensor([1.0, -1.0]).view(1, 1, 2, 1, 1)
    logits = torch.zeros(1, 1, 4, 2, 2)
    prior = torch.zeros(1, 1, 4, 2, 2)
    prior[0, 0, 0:2] = 0.75  # first bottleneck cell: 0.75
    prior[0, 0, 2, 0, 0] = 1.0  # second: 1/8
    out = CGCOutput(logits, coarse, None)
    total, parts = CGCLoss(lambda_cg=3.0)(out, prior)
    expected_coarse = (_bce(1.0, 0.75) + _bce(-1.0, 0.125)) / 2
    expected_bce = sum(_bce(0.0, t) for t in prior.flatten().tolist()) / 16
    assert parts["coarse"].item() == pytest.approx(expected_coarse, rel=1e-6)
    assert parts["fine"].item() == 0.0
    assert total.item() == pytest.approx(expected_bce + 3.0 * expected_coarse, rel=1e-6)


def test_cgc_loss_absent_paths_are_zero():
    out, prior, brain = _hand_output()
    total, parts = CGCLoss()(CGCOutput(out.logits), prior, brain)
    assert parts["coarse"].item() == 0.0 and parts["fine"].item() == 0.0
    assert total.item() == pytest.approx(parts["bce"].item())


def test_cgc_loss_brain_mask_restricts_terms():
    out, prior, _ = _hand_output()
    brain = torch.zeros(1, 1, 4, 4, 2, dtype=torch.bool)
    brain[0, 0, 0:2, :, :] = True  # only bottleneck cells (0, 0) and (0, 1)
    _, parts = CGCLoss(temperature=0.3)(out, prior, brain)
    assert parts["bce"].item() == pytest.approx(
        masked_bce_with_logits(out.logits, prior, brain).item(), rel=1e-6
    )
    coarse = masked_bce_with_logits(out.coarse_logits[:, :, 0:1], torch.full((1, 1, 1, 2, 1), 0.9))
    assert parts["coarse"].item() == pytest.approx(coarse.item(), rel=1e-6)
    # Out-of-brain patches leave the contrast: only patches 0 and 1, both lesion.
    fine = PatchSupConLoss(0.3)(out.patch_embeddings[0, :2], torch.tensor([True, True]))
    assert parts["fine"].item() == pytest.approx(fine.item(), rel=1e-6)


def test_cgc_loss_with_network_end_to_end():
    torch.manual_seed(0)
    net = CGCUNet(1, channels=(4, 8), patch_size=(2, 2, 1), proj_dim=8)
    x = torch.randn(2, 1, 8, 8, 4)
    prior = torch.zeros(2, 1, 8, 8, 4)
    prior[:, :, :4] = 1.0
    brain = torch.ones_like(prior, dtype=torch.bool)
    total, parts = CGCLoss()(net.forward_train(x), prior, brain)
    assert torch.isfinite(total) and parts["fine"].item() > 0
    total.backward()
    assert net.backbone.stem.conv1.weight.grad.abs().sum() > 0
    assert net.cgc.coarse.head.weight.grad.abs().sum() > 0
    assert net.cgc.fine.proj[2].weight.grad.abs().sum() > 0


def test_cgc_loss_rejects_prior_on_another_grid():
    out, prior, _ = _hand_output()
    with pytest.raises(SpaceMismatchError):
        CGCLoss()(out, prior[..., :1])
    with pytest.raises(SpaceMismatchError):
        CGCLoss()(out, prior, torch.ones(1, 1, 4, 4, 1, dtype=torch.bool))


def test_cgc_loss_requires_patch_size_with_embeddings():
    out, prior, _ = _hand_output()
    with pytest.raises(ValueError, match="patch_size"):
        CGCLoss()(out._replace(patch_size=None), prior)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lambda_cg": -1.0},
        {"lambda_fg": float("nan")},
        {"lambda_fg": "1"},
        {"temperature": 0.0},
        {"patch_threshold": 0.0},
        {"patch_threshold": 1.5},
        {"anchors": "everything"},
    ],
)
def test_cgc_loss_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        CGCLoss(**kwargs)


# --------------------------------------------------------------------------- anisotropic network


def test_cgc_loss_pools_prior_with_the_per_axis_factors_of_a_thick_slice_network():
    # strides ((2,2,1), (2,2,1)): factors (4, 4, 1), so a bottleneck voxel is a 4 x 4 x 1 block
    torch.manual_seed(0)
    net = CGCUNet(1, channels=(4, 8, 16), patch_size=(1, 1, 2), proj_dim=8,
                  strides=[(2, 2, 1), (2, 2, 1)])
    assert net.downsample_factors == (4, 4, 1)
    prior = torch.zeros(1, 1, 8, 8, 3)
    prior[0, 0, 0:4, 0:4, 0] = 1.0  # bottleneck voxel (0, 0, 0): 16/16
    prior[0, 0, 4:8, 4:6, 1] = 1.0  # bottleneck voxel (1, 1, 1): 8/16
    prior[0, 0, 0, 4, 2] = 1.0  # bottleneck voxel (0, 1, 2): 1/16
    out = net.forward_train(torch.randn(1, 1, 8, 8, 3))
    assert out.bottleneck_size == (2, 2, 3)
    target = torch.zeros(1, 1, 2, 2, 3)
    target[0, 0, 0, 0, 0] = 1.0
    target[0, 0, 1, 1, 1] = 0.5
    target[0, 0, 0, 1, 2] = 1 / 16
    torch.testing.assert_close(downsample_to(prior, out.bottleneck_size), target)
    # the coarse term is L^cg_bce against exactly that target (an isotropic factor of 4 would
    # not even divide the 3 slices)
    _, parts = CGCLoss()(out, prior)
    expected = masked_bce_with_logits(out.coarse_logits, target)
    assert parts["coarse"].item() == pytest.approx(expected.item(), rel=1e-6)
    # mini-patches of 1 x 1 x 2 bottleneck voxels (remainder slice dropped), C order:
    # (0,0,z0-1) mean 0.5 -> lesion; (1,1,z0-1) mean 0.25; the others lower
    labels = patch_lesion_labels(target, out.patch_size)
    assert labels.tolist() == [[True, False, False, False]]
