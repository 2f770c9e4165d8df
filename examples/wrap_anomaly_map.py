"""Wrap an external anomaly map (e.g. a VAE residual) as a prior and refine it.

The anomaly scores are mapped to [0, 1] label-free by ``kind="scores"`` (the robust z-score
rule inside the brain: p = 0.5 three robust standard deviations above the median). Without ``--scores``, a stand-in residual is made
from the image itself: a smoothed robust z-score of the FLAIR, which, like a VAE residual,
is large where the image departs from typical tissue::

    python examples/wrap_anomaly_map.py
    python examples/wrap_anomaly_map.py --image flair.nii.gz --scores vae_residual.nii.gz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from cgc_refine import Refiner, RefinerConfig
from cgc_refine.brain import derive_brain_mask, robust_normalise
from cgc_refine.io import load_array, load_volume
from cgc_refine.metrics import dice
from cgc_refine.phantom import make_phantom
from cgc_refine.priors import as_probability_map


def residual_stand_in(image: np.ndarray, brain: np.ndarray, sigma_vox: float = 1.0) -> np.ndarray:
    """Smoothed robust z-score of the image inside the brain (an anomaly-score stand-in)."""
    z = robust_normalise(image, brain)[0]
    return np.where(brain, ndimage.gaussian_filter(z, sigma_vox), 0.0).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--scores", type=Path, help="anomaly/residual map on the image grid")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    truth = None
    if args.image is None:
        phantom = make_phantom((48, 48, 24), seed=3)
        volume, brain, truth = phantom.volume, phantom.brain, phantom.truth
    else:
        volume = load_volume(args.image)
        brain = derive_brain_mask(volume.data)
    if args.scores is None:
        scores = residual_stand_in(volume.data[0], brain)
    else:
        scores, _ = load_array(args.scores, reference=volume)
    prior = as_probability_map(scores, volume.affine, kind="scores", brain_mask=brain)
    print(f"scores -> probability: {prior.params['method']} rule, "
          f"{float((prior.data >= 0.5).sum())} voxels at p >= 0.5")

    refiner = Refiner([prior], config=RefinerConfig.fast(iterations=args.iterations), device=args.device)
    mask = refiner.fit([volume], brain_masks=[brain]).predict(volume, brain)
    print(f"refined mask: {int(mask.sum())} lesion voxels")
    if truth is not None:
        print(f"phantom Dice: prior {dice(prior.data >= 0.5, truth):.3f}, refined {dice(mask, truth):.3f}")


if __name__ == "__main__":
    main()
