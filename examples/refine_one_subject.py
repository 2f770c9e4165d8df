"""Refine one subject from Python: GMM prior -> CGC refiner -> mask, probability map, sidecar.

The same library function as the ``cgc-refine --prior gmm --image ...`` command
(:func:`cgc_refine.workflow.refine_subject`). Run on the built-in phantom (default) or on
your own skull-stripped FLAIR::

    python examples/refine_one_subject.py                                  # phantom, CPU
    python examples/refine_one_subject.py --image sub-01_FLAIR.nii.gz --brain-mask brain.nii.gz
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cgc_refine import RefinerConfig
from cgc_refine.io import save_array, save_mask
from cgc_refine.phantom import make_phantom
from cgc_refine.workflow import RunOptions, SubjectOutputs, refine_subject


def write_phantom(folder: Path) -> tuple[Path, Path, Path]:
    """A synthetic phantom's FLAIR, brain mask and lesion truth as NIfTI files in ``folder``."""
    phantom = make_phantom((48, 48, 24))
    image = folder / "phantom_FLAIR.nii.gz"
    brain = folder / "phantom_brain.nii.gz"
    truth = folder / "phantom_truth.nii.gz"
    save_array(phantom.volume.data[0], phantom.volume, image, "float32", overwrite=True)
    save_mask(phantom.brain, phantom.volume, brain, overwrite=True)
    save_mask(phantom.truth, phantom.volume, truth, overwrite=True)
    return image, brain, truth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="FLAIR NIfTI (default: a synthetic phantom)")
    parser.add_argument("--brain-mask", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix="cgc_refine_"))
    out.mkdir(parents=True, exist_ok=True)
    image, brain, truth = args.image, args.brain_mask, None
    if image is None:
        image, brain, truth = write_phantom(out)

    outputs = SubjectOutputs(mask=out / "label-lesion_mask.nii.gz",
                             probability=out / "label-lesion_probseg.nii.gz")
    result = refine_subject([image], "gmm", outputs, RefinerConfig.fast(iterations=args.iterations),
                            brain_mask=brain, truth=truth,
                            options=RunOptions(device=args.device, overwrite=True))
    voxels = result.sidecar["lesion"]["voxels"]
    print(f"wrote {outputs.mask} ({voxels} lesion voxels, {result.lesion_ml:.2f} ml; "
          f"prior {result.prior_ml:.2f} ml) in {result.seconds:.1f} s")
    if result.evaluation is not None:
        print(f"phantom Dice: prior {result.evaluation['prior']['dice']:.3f}, "
              f"refined {result.evaluation['refined']['dice']:.3f}")


if __name__ == "__main__":
    main()
