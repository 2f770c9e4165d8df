"""How often the CGC paths have something to learn on thick-slice data: anisotropic vs isotropic.

Issue 10, item 7: on the WMH cases (0.47 x 0.47 x 8 mm) an isotropically pooled network has a
bottleneck voxel of 3.75 x 3.75 x 64 mm, so the down-sampled prior almost never reaches 0.5
and the fine (contrastive) loss has no lesion mini-patch. For each case this draws the same
training batches the CPU ``--fast`` recipe draws (its crop sampler, lesion oversampling,
seed 0) under both geometries and counts, over the batches whose target contains lesion:

- **coarse ≥ 0.5**: the down-sampled target reaches 0.5 somewhere in the brain (the coarse
  path has a lesion voxel to learn);
- **fine active**: the fine loss of a freshly initialised network is non-zero (the batch has
  lesion and non-lesion mini-patches).

Only the priors are read (cleaned, as the recipe trains on them); no network is trained and
no ground truth is read.

Usage::

    python benchmarks/fine_loss_activity.py --source wmh [--batches 100]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_recipe import case_prior, dev_cases  # noqa: E402

from cgc_refine import RefinerConfig  # noqa: E402
from cgc_refine.brain import derive_brain_mask  # noqa: E402
from cgc_refine.distributed import DistributedContext  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.model import CGCLoss, downsample_to  # noqa: E402
from cgc_refine.subjects import SubjectReader  # noqa: E402
from cgc_refine.training import CropSampler, build_network, plan_training  # noqa: E402


def activity(subject, config: RefinerConfig, batches: int) -> tuple[int, int, int, tuple, list]:
    """(lesion batches, coarse >= 0.5, fine active, crop, strides) over ``batches`` batches."""
    plan = plan_training([subject], config, torch.device("cpu"), DistributedContext(), seed=0)
    torch.manual_seed(0)
    network = build_network(config, plan.n_channels, strides=plan.strides).eval()
    loss = CGCLoss(temperature=config.temperature)
    sampler = CropSampler(plan.subjects, plan.crop, config.foreground_oversampling, seed=0)
    lesion = coarse = fine = 0
    with torch.no_grad():
        for _ in range(batches):
            image, prior, brain = sampler.batch(config.batch_size)
            if not bool((prior[brain] >= 0.5).any()):
                continue
            lesion += 1
            output = network.forward_train(image)
            coarse += int(bool((downsample_to(prior, output.bottleneck_size) >= 0.5).any()))
            _, parts = loss(output, prior, brain)
            fine += int(float(parts["fine"]) > 0.0)
    return lesion, coarse, fine, plan.crop, plan.strides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("brats", "raw", "wmh"), default="wmh")
    parser.add_argument("--prior", default="gmm")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    print(f"# fine_loss_activity: source {args.source}, prior {args.prior} (cleaned), RefinerConfig.fast(), "
          f"{args.batches} batches of 2 crops per case and geometry, seed 0")
    print("| case | spacing (mm) | geometry | crop (voxels) | strides | lesion batches | coarse ≥ 0.5 | fine active |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {True: [0, 0, 0], False: [0, 0, 0]}
    for case in dev_cases(args.source):
        volume = load_volume(str(case["images"][0]))
        brain = load_mask(case["brain"], reference=volume) if case["brain"] else derive_brain_mask(volume.data)
        prior = case_prior(case, args.prior, volume, volume, brain)
        subject = SubjectReader(None, "mri", "probability", 0, "auto").prepare(0, volume, brain, prior)
        spacing = "×".join(f"{v:.2f}" for v in volume.spacing)
        for anisotropic in (True, False):
            config = RefinerConfig.fast(anisotropic=anisotropic).validate()
            lesion, coarse, fine, crop, strides = activity(subject, config, args.batches)
            for i, value in enumerate((lesion, coarse, fine)):
                totals[anisotropic][i] += value
            print(f"| {case['name']} | {spacing} | {'anisotropic' if anisotropic else 'isotropic'} | "
                  f"{'×'.join(map(str, crop))} | {strides or 'isotropic 2'} | {lesion} | "
                  f"{coarse} ({coarse / max(lesion, 1):.0%}) | {fine} ({fine / max(lesion, 1):.0%}) |", flush=True)
    for anisotropic in (True, False):
        lesion, coarse, fine = totals[anisotropic]
        print(f"| **all** | | {'anisotropic' if anisotropic else 'isotropic'} | | | {lesion} | "
              f"{coarse / max(lesion, 1):.0%} | {fine / max(lesion, 1):.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
