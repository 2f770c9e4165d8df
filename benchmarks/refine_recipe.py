"""The label-free refinement recipe, single subject, on the real dev cases (CPU ``--fast``).

For each case this computes a built-in prior (or reads the external one), then fits
``Refiner`` on that one subject (transductive, as ``cgc-refine --prior ... --image ...``
does) with ``RefinerConfig.fast()`` plus any ``--set`` overrides, and prints per case: the
prior's Dice, the cleaned prior's Dice (the label-free clean-up alone, no network), the
network's TTA-averaged output alone, the refined mask (the output blend with the cleaned
prior, ``output_blend``, then the clean-up of the output) and the guarded result (the collapse
guard's fallback), with the fit time, the total time and the TTA agreement.
Ground truth is read only to score; nothing in the fit sees it.

Cases (``--source``): ``brats`` (z-scored BraTS 2015; FLAIR + T1c; given brain mask),
``raw`` (raw BraTS 2021/2018; FLAIR + T1ce; derived brain mask), ``wmh`` (clinical FLAIR,
thick slices; derived brain mask; ``--prior external`` is the network's ``seg.nii.gz``).

Usage::

    python benchmarks/refine_recipe.py --source brats --prior gmm [--set '{"rounds": 2}'] [--cases ...]
    python benchmarks/refine_recipe.py --source wmh --prior external --cleanup-only   # seconds per case
    python benchmarks/refine_recipe.py --source brats --rescore /tmp/brats_gmm   # maps of --save-dir

``--rescore DIR`` scores, from the maps a ``--save-dir`` run saved, the output variants without
training again: the network alone, network + clean-up, and the ``output_blend`` variants
(``"confidence"``, and the plain mean of network and cleaned prior) + clean-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_refine import Refiner, RefinerConfig  # noqa: E402
from cgc_refine.brain import derive_brain_mask  # noqa: E402
from cgc_refine.cleanup import CleanupSettings, clean_probability  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.priors import ProbabilityMap, as_probability_map, make_prior  # noqa: E402

DATA = Path(os.environ.get("CGC_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def dev_cases(source: str) -> list[dict]:
    """The dev cases of one source: images (FLAIR first), brain mask, truth, external prior."""
    cases = []
    if source == "brats":
        for folder in sorted((DATA / "deepmedic_brats2015").glob("brats_*")):
            cases.append(dict(name=folder.name, images=[folder / "Flair_subtrMeanDivStd.nii.gz",
                                                        folder / "T1c_subtrMeanDivStd.nii.gz"],
                              brain=folder / "brainmask.nii.gz", truth=folder / "OTMultiClass.nii.gz",
                              external=None))
    elif source == "raw":
        for parent in ("brats2021_3dbrainthesis", "brats2018_deepbrainseg"):
            for folder in sorted((DATA / parent).iterdir()):
                if folder.is_dir():
                    pick = lambda suffix: next(folder.glob(f"*_{suffix}.nii*"))  # noqa: E731
                    pred = list(folder.glob("*_pred.nii*"))
                    cases.append(dict(name=folder.name, images=[pick("flair"), pick("t1ce")], brain=None,
                                      truth=pick("seg"), external=pred[0] if pred else None))
    elif source == "wmh":
        for folder in sorted((DATA / "wmh_vbnet_clinical").iterdir()):
            if folder.is_dir():
                cases.append(dict(name=folder.name, images=[folder / "t2flair-stripped.nii.gz"], brain=None,
                                  truth=folder / "gt.nii.gz", external=folder / "seg.nii.gz"))
    else:
        raise SystemExit(f"unknown source {source!r}")
    return cases


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def rescore(source: str, folder: Path) -> int:
    """Score saved maps (see the module docstring); prints a Markdown table."""
    from cgc_refine.refiner import blend_with_prior

    print(f"# refine_recipe --rescore {folder}: {date.today()}, {platform.node()}, source {source}")
    print("| case | prior | cleaned prior | network | network + clean-up | mean blend + clean-up "
          "| confidence blend + clean-up |\n|---|---|---|---|---|---|---|")
    rows = []
    for case in dev_cases(source):
        path = folder / f"{case['name']}_network.npy"
        if not path.is_file():
            continue
        load = lambda tag: np.load(folder / f"{case['name']}_{tag}.npy")  # noqa: E731
        network, cleaned, prior, truth, brain = (load(t) for t in ("network", "cleaned", "prior", "truth", "brain"))
        reference = load_volume(str(case["images"][0]))

        def clean(p: np.ndarray) -> np.ndarray:
            return clean_probability(p, reference.spacing, CleanupSettings(), brain_mask=brain,
                                     affine=reference.affine).mask > 0

        row = [dice(prior >= 0.5, truth), dice(cleaned >= 0.5, truth), dice(network >= 0.5, truth),
               dice(clean(network), truth), dice(clean(0.5 * network + 0.5 * cleaned), truth),
               dice(clean(blend_with_prior(network, cleaned)), truth)]
        rows.append(row)
        print(f"| {case['name']} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
    if rows:
        table = np.array(rows)
        print("| **mean** | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(0), table.std(0))) + " |")
    return 0


def load_case(case: dict, prior_name: str, channels: int) -> dict:
    """The case's input volume, FLAIR, brain mask, ground truth and built-in or external prior."""
    volume = load_volume([str(p) for p in case["images"][:channels]])
    flair = load_volume(str(case["images"][0]))
    brain = load_mask(case["brain"], reference=volume) if case["brain"] else derive_brain_mask(flair.data)
    truth = np.asanyarray(__import__("nibabel").load(str(case["truth"])).dataobj) > 0
    prior = case_prior(case, prior_name, volume, flair, brain)
    return dict(name=case["name"], volume=volume, brain=brain, truth=truth, prior=prior)


def case_prior(case: dict, prior_name: str, volume: Any, flair: Any, brain: np.ndarray) -> ProbabilityMap:
    """The case's prior: a built-in one, the external network output, or the residual stand-in.

    ``residual`` is the stand-in for a VAE residual map of ``paper_tables.py`` (smoothed robust
    z-score of the FLAIR) read through the ``scores`` adapter.
    """
    if prior_name == "external":
        # The raw BraTS _pred files lost their affine but lie on the image grid (SOURCES.md).
        labels = np.asanyarray(__import__("nibabel").load(str(case["external"])).dataobj)
        return as_probability_map(labels, volume.affine, kind="mask", brain_mask=brain)
    if prior_name == "residual":
        from paper_tables import residual_stand_in

        return as_probability_map(residual_stand_in(flair, brain), volume.affine, kind="scores", brain_mask=brain)
    return make_prior(prior_name).compute(flair, brain)


def cohort(args: argparse.Namespace, config: RefinerConfig) -> int:
    """Table 4 analogue: a transductive cohort fit on all cases, and leave-one-out folds.

    Each fold fits one network on the other cases (their priors as targets) and applies it to
    the held-out case with that case's own prior (the output blend and clean-up use it, as
    ``cgc-refine predict --prior`` does); ground truth is read only to score.
    """
    cases = [load_case(c, args.prior, args.channels) for c in dev_cases(args.source)
             if not args.cases or c["name"] in args.cases]
    print("| case | prior | cleaned prior | cohort (transductive) | leave-one-out | LOO fit s |")
    print("|---|---|---|---|---|---|")

    def fit(train: list[dict]) -> Refiner:
        return Refiner([ProbabilityMap(c["prior"].data, c["volume"].affine) for c in train], config=config,
                       prior_kind="probability", device=args.device, random_state=args.seed).fit(
            [c["volume"] for c in train], brain_masks=[c["brain"] for c in train])

    def refine(refiner: Refiner, c: dict) -> np.ndarray:
        probability = refiner.predict_proba(c["volume"], c["brain"], prior=c["prior"])
        return refiner.postprocess(probability, c["volume"].spacing, affine=c["volume"].affine,
                                   brain_mask=c["brain"]) > 0

    everyone = fit(cases)
    rows = []
    for i, c in enumerate(cases):
        started = time.perf_counter()
        held_out = fit(cases[:i] + cases[i + 1:])
        seconds = time.perf_counter() - started
        cleaned = clean_probability(c["prior"].data, c["volume"].spacing, CleanupSettings(), brain_mask=c["brain"],
                                    affine=c["volume"].affine).mask > 0
        row = [dice(c["prior"].data >= 0.5, c["truth"]), dice(cleaned, c["truth"]),
               dice(refine(everyone, c), c["truth"]), dice(refine(held_out, c), c["truth"])]
        rows.append(row)
        print(f"| {c['name']} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {seconds:.0f} |", flush=True)
    table = np.array(rows)
    print("| **mean** | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(0), table.std(0))) + " | |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("brats", "raw", "wmh"), default="brats")
    parser.add_argument("--prior", default="gmm",
                        help="a built-in prior name, 'external' (the case's network output) or 'residual'")
    parser.add_argument("--set", default="{}", help="JSON overrides of RefinerConfig.fast()")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, default=2, help="modalities used (FLAIR first)")
    parser.add_argument("--save-dir", type=Path, default=None,
                        help="also save each case's prior, cleaned prior and network probability (.npy)")
    parser.add_argument("--rescore", type=Path, default=None, help="score the maps a --save-dir run saved")
    parser.add_argument("--cleanup-only", action="store_true",
                        help="score the prior and the cleaned prior only (no network)")
    parser.add_argument("--full", action="store_true",
                        help="the full configuration (RefinerConfig()) instead of RefinerConfig.fast()")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--tta-sweep", action="store_true",
                        help="also score each fitted model with 1, 2, 4 and 8 TTA copies (the TTA ablation)")
    parser.add_argument("--cohort", action="store_true",
                        help="Table 4: one transductive cohort fit on all cases, then leave-one-out folds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.rescore is not None:
        return rescore(args.source, args.rescore)
    overrides = json.loads(args.set)
    config = RefinerConfig(**overrides) if args.full else RefinerConfig.fast(**overrides)
    if args.cohort:
        return cohort(args, config)
    print(f"# refine_recipe: {date.today()}, {platform.node()}, source {args.source}, prior {args.prior}, "
          f"seed {args.seed}, RefinerConfig{'' if args.full else '.fast'}(**{overrides}), device {args.device}, "
          f"threads {__import__('torch').get_num_threads()}, channels {args.channels}")
    if args.cleanup_only:
        print("| case | prior | cleaned prior | pattern (auto) |\n|---|---|---|---|")
    else:
        print("| case | prior | cleaned prior | network | refined | guarded | fit s | total s | TTA agreement |")
        print("|---|---|---|---|---|---|---|---|---|")
    rows, sweep = [], []
    for case in dev_cases(args.source):
        if args.cases and case["name"] not in args.cases:
            continue
        volume = load_volume([str(p) for p in case["images"][: args.channels]])
        flair = load_volume(str(case["images"][0]))
        brain = load_mask(case["brain"], reference=volume) if case["brain"] else derive_brain_mask(flair.data)
        truth = np.asanyarray(__import__("nibabel").load(str(case["truth"])).dataobj) > 0
        if args.prior == "external" and case["external"] is None:
            continue
        prior = case_prior(case, args.prior, volume, flair, brain)
        settings = CleanupSettings(pattern=config.cleanup if config.cleanup != "none" else "auto")
        cleaning = clean_probability(prior.data, volume.spacing, settings, brain_mask=brain, affine=volume.affine)
        cleaned = cleaning.mask
        if args.cleanup_only:
            row = [dice(prior.data >= 0.5, truth), dice(cleaned > 0, truth)]
            rows.append(row)
            print(f"| {case['name']} | {row[0]:.3f} | {row[1]:.3f} | {cleaning.info['pattern']} "
                  f"(share {cleaning.info.get('largest_share', 0):.2f}, "
                  f"laterality {cleaning.info.get('largest_laterality', 0):.2f}) |", flush=True)
            continue
        started = time.perf_counter()
        refiner = Refiner([ProbabilityMap(prior.data, volume.affine)], config=config, prior_kind="probability",
                          device=args.device, random_state=args.seed).fit([volume], brain_masks=[brain])
        fitted = time.perf_counter()
        probability = refiner.predict_proba(volume, brain, prior=prior)
        network = refiner.network_probability_
        refined = refiner.postprocess(probability, volume.spacing, affine=volume.affine, brain_mask=brain)
        guarded, _ = refiner.guard(refined, cleaned)
        if args.save_dir is not None:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            for tag, array in (("prior", prior.data), ("cleaned", cleaning.probability), ("network", network),
                               ("truth", truth), ("brain", brain)):
                np.save(args.save_dir / f"{case['name']}_{tag}.npy", array)
        total = time.perf_counter() - started
        if args.tta_sweep:
            sweep.append([case["name"], *tta_sweep(refiner, volume, brain, prior, truth)])
        row = [dice(prior.data >= 0.5, truth), dice(cleaned > 0, truth), dice(network >= 0.5, truth),
               dice(refined > 0, truth), dice(guarded > 0, truth)]
        rows.append(row)
        print(f"| {case['name']} | " + " | ".join(f"{v:.3f}" for v in row)
              + f" | {fitted - started:.0f} | {total:.0f} | {refiner.tta_agreement_:.3f} |", flush=True)
    if rows:
        table = np.array(rows)
        print("| **mean** | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(0), table.std(0)))
              + (" |" if args.cleanup_only else " | | | |"))
    if sweep:
        print_tta_sweep(sweep)
    return 0


#: Copies of the TTA ablation (:func:`tta_sweep`).
TTA_COPIES = (1, 2, 4, 8)


def tta_sweep(refiner: Refiner, volume: Any, brain: np.ndarray, prior: Any, truth: np.ndarray) -> list[float]:
    """The fitted model's refined Dice and TTA agreement with 1, 2, 4 and 8 flipped copies."""
    import dataclasses

    fitted = refiner.config_
    scores, agreements = [], []
    for copies in TTA_COPIES:
        refiner.config_ = dataclasses.replace(fitted, tta=copies)
        probability = refiner.predict_proba(volume, brain, prior=prior)
        refined = refiner.postprocess(probability, volume.spacing, affine=volume.affine, brain_mask=brain)
        scores.append(dice(refined > 0, truth))
        agreements.append(refiner.tta_agreement_)
    refiner.config_ = fitted
    return scores + agreements


def print_tta_sweep(sweep: list[list[Any]]) -> None:
    """The TTA ablation's table: refined Dice per copy count, then the copies' agreement."""
    heads = [f"refined, TTA {n}" for n in TTA_COPIES] + [f"agreement, TTA {n}" for n in TTA_COPIES[1:]]
    print("\n| case | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    for name, *values in sweep:
        values = values[:len(TTA_COPIES)] + values[len(TTA_COPIES) + 1:]  # TTA 1 agrees with itself
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    table = np.array([[*v[:len(TTA_COPIES)], *v[len(TTA_COPIES) + 1:]] for _, *v in sweep], dtype=float)
    print("| **mean** | " + " | ".join(f"{m:.3f}" for m in table.mean(0)) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
