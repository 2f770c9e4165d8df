"""Refinement quality on the six BraTS cases: prior, backbone, coarse only, fine only, full CGC.

Every variant trains one network on all six cases with their GMM priors (transductive
cohort training, as an unsupervised method may: no labels are read before scoring) and
predicts each case; ground truth (whole tumour = label > 0) is read only to score.

Without CUDA, or with ``--reduced``, the script runs the reduced CPU mode
(``RefinerConfig.fast()``, few iterations): its Dice says little about the paper's setting.

Usage::

    python benchmarks/refine_brats.py [--iterations N] [--reduced] [--device auto] [--seed 0]
        [--variants backbone,coarse,fine,full]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cgc_refine.cohort import PRESETS, find_subjects  # noqa: E402
from cgc_refine.config import RefinerConfig  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.metrics import evaluate  # noqa: E402
from cgc_refine.priors import GMMPrior  # noqa: E402
from cgc_refine.refiner import Refiner  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepmedic_brats2015"
VARIANTS = {
    "backbone": dict(use_coarse=False, use_fine=False),
    "coarse": dict(use_coarse=True, use_fine=False),
    "fine": dict(use_coarse=False, use_fine=True),
    "full": dict(use_coarse=True, use_fine=True),
}
LABELS = {
    "prior": "GMM prior, threshold 0.5",
    "backbone": "backbone + prior (no CGC)",
    "coarse": "+ coarse path only",
    "fine": "+ fine path only",
    "full": "full CGC (coarse + fine)",
}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--reduced", action="store_true", help="reduced CPU configuration")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="backbone,coarse,fine,full")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--patch-size", type=int, nargs=3, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    subjects = find_subjects(args.data, **PRESETS["brats-deepmedic"])  # type: ignore[arg-type]
    if not subjects:
        print(f"no BraTS cases under {args.data}")
        return 1
    reduced = args.reduced or not torch.cuda.is_available()
    base = RefinerConfig.fast() if reduced else RefinerConfig()
    overrides: dict[str, object] = {"temperature": args.temperature}
    if args.iterations:
        overrides["iterations"] = args.iterations
    if args.patch_size:
        overrides["patch_size"] = tuple(args.patch_size)
    base = dataclasses.replace(base, **overrides)

    volumes, brains, truths, priors = [], [], [], []
    for subject in subjects:
        volume = load_volume(subject.images)
        brain = load_mask(subject.brain_mask, reference=volume)
        volumes.append(volume)
        brains.append(brain)
        truths.append(load_mask(subject.truth, reference=volume))
        priors.append(GMMPrior().compute(volume, brain))
    dice: dict[str, list[float]] = {"prior": [], **{v: [] for v in args.variants.split(",")}}
    assd: dict[str, list[float]] = {k: [] for k in dice}
    seconds: dict[str, float] = {}
    for prior, truth, volume in zip(priors, truths, volumes):
        scores = evaluate(prior.data >= 0.5, truth, volume.spacing)
        dice["prior"].append(scores["dice"])
        assd["prior"].append(scores["assd"])
    device_name = "cpu"
    for variant in args.variants.split(","):
        config = dataclasses.replace(base, **VARIANTS[variant])
        start = time.perf_counter()
        refiner = Refiner(priors, config=config, device=args.device, random_state=args.seed)
        refiner.fit(volumes, brain_masks=brains)
        device_name = str(refiner.device_)
        for volume, brain, truth in zip(volumes, brains, truths):
            scores = evaluate(refiner.predict(volume, brain), truth, volume.spacing)
            dice[variant].append(scores["dice"])
            assd[variant].append(scores["assd"])
        seconds[variant] = time.perf_counter() - start
        print(f"{variant}: mean Dice {statistics.mean(dice[variant]):.4f} ({seconds[variant]:.0f} s)", flush=True)

    card = torch.cuda.get_device_name(0) if device_name.startswith("cuda") else "CPU"
    mode = "reduced CPU mode (RefinerConfig.fast)" if reduced else "full configuration"
    print()
    print(f"# BraTS refinement, {date.today().isoformat()}, {card}, {mode}, {base.iterations} iterations, "
          f"tau {base.temperature}, patch {list(base.patch_size)}, seed {args.seed}, transductive cohort training on 6 cases")
    print(f"# command: python benchmarks/refine_brats.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    print()
    names = [s.name.replace("brats_2013_", "") for s in subjects]
    print("| method | " + " | ".join(names) + " | mean ± sd Dice | mean ± sd ASSD mm |")
    print("|---|" + "---|" * len(names) + "---|---|")
    for key, values in dice.items():
        print(f"| {LABELS[key]} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {mean_sd(values)} | {mean_sd(assd[key])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
