"""Benchmark of the built-in priors on the real cases in ../shared/data.

For every case: Dice, sensitivity and HD95 (mm) of the GMM prior and of the Mumford-Shah
prior thresholded at 0.5 (optionally of a plain scikit-learn GaussianMixture(4) too), and
the GMM speed test:
histogram EM against ``sklearn.mixture.GaussianMixture`` on the same (binned) brain voxels,
from the same starting parameters, for the same number of EM iterations (``tol=0``), with
the relative difference of their mean log-likelihoods.

Ground truth is read only to score the priors. Speed is reported as ratios measured in the
same run, never as single absolute times.

Usage::

    python benchmarks/priors.py [--data ../shared/data] [--speed-iters 20] [--device auto]
        [--sklearn-baseline] [--skip-speed | --speed-only]

The tables printed at the end are what ``benchmarks/RESULTS.md`` records.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_refine import metrics  # noqa: E402
from cgc_refine.cohort import PRESETS, find_subjects  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.priors import GMMPrior, MumfordShahPrior  # noqa: E402
from cgc_refine.priors.base import prepare_prior_input  # noqa: E402
from cgc_refine.priors.gmm import (  # noqa: E402
    fit_histogram_gmm,
    intensity_histogram,
    kmeans_initialisation,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOURCES = {"deepmedic_brats2015": "brats-deepmedic", "wmh_vbnet_clinical": "wmh-vbnet"}


def real_cases(root: Path) -> list[tuple[str, object]]:
    """(source, subject) for every real case found under ``root``."""
    cases = []
    for folder, preset in SOURCES.items():
        if (root / folder).is_dir():
            for subject in find_subjects(root / folder, **PRESETS[preset]):  # type: ignore[arg-type]
                cases.append((folder, subject))
    return cases


def sklearn_baseline_dice(values: np.ndarray, brain: np.ndarray, truth: np.ndarray, spacing) -> float:  # type: ignore[no-untyped-def]
    """Dice of a plain ``GaussianMixture(4)`` (scikit-learn defaults, random_state=0) on the
    brain voxels, foreground = posterior of the brightest component > 0.5 -- the issue's
    reference point."""
    from sklearn.mixture import GaussianMixture

    samples = values.reshape(-1, 1).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixture = GaussianMixture(4, random_state=0).fit(samples)
    posterior = mixture.predict_proba(samples)[:, int(np.argmax(mixture.means_[:, 0]))]
    mask = np.zeros(brain.shape, dtype=bool)
    mask[brain] = posterior > 0.5
    return metrics.dice(mask, truth)


def gmm_speed(values: np.ndarray, k: int, n_iter: int, repeats: int = 20) -> dict[str, float]:
    """Histogram EM vs scikit-learn on the same binned voxels and the same start."""
    from sklearn.mixture import GaussianMixture

    t0 = time.perf_counter()
    centres, counts, index = intensity_histogram(values, 1024, return_index=True)
    t_hist = time.perf_counter() - t0
    weights, means, variances = kmeans_initialisation(centres, counts, k)
    ours = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model = fit_histogram_gmm(
            centres, counts, k, max_iter=n_iter, tol=0.0,
            weights_init=weights, means_init=means, variances_init=variances,
        )
        ours.append(time.perf_counter() - t0)
    t_ours = statistics.median(ours)
    binned = centres[index].reshape(-1, 1)
    reference = GaussianMixture(
        k, covariance_type="full", tol=0.0, max_iter=n_iter, init_params="random_from_data",
        weights_init=weights, means_init=means.reshape(-1, 1),
        precisions_init=(1.0 / variances).reshape(-1, 1, 1), random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        reference.fit(binned)
        t_sklearn = time.perf_counter() - t0
    ll_sklearn = float(reference.score(binned))
    return {
        "voxels": float(values.size),
        "bins": float(centres.size),
        "t_hist": t_hist,
        "t_em": t_ours,
        "t_sklearn": t_sklearn,
        "ratio_em": t_sklearn / t_ours,
        "ratio_total": t_sklearn / (t_ours + t_hist),
        "ll_rel_diff": abs(model.log_likelihood - ll_sklearn) / abs(ll_sklearn),
        "mean_max_diff": float(np.max(np.abs(np.sort(reference.means_.ravel()) - model.means))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--speed-iters", type=int, default=20, help="EM iterations for the speed test")
    parser.add_argument("--device", default="auto", help="device of the Mumford-Shah prior")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="only the GMM speed test")
    parser.add_argument("--sklearn-baseline", action="store_true",
                        help="also score plain sklearn GaussianMixture(4), brightest component > 0.5")
    args = parser.parse_args(argv)

    cases = real_cases(args.data)
    if not cases:
        print(f"no real cases under {args.data}; nothing to benchmark")
        return 1
    rows = []
    for source, subject in cases:
        volume = load_volume(subject.images)  # type: ignore[attr-defined]
        truth = load_mask(subject.truth, reference=volume)  # type: ignore[attr-defined]
        brain = load_mask(subject.brain_mask, reference=volume) if subject.brain_mask else None  # type: ignore[attr-defined]
        row: dict[str, object] = {"source": source, "case": subject.name}  # type: ignore[attr-defined]
        priors = () if args.speed_only else (("gmm", GMMPrior()), ("ms", MumfordShahPrior(device=args.device)))
        for name, prior in priors:
            prob = prior.compute(volume, brain)
            scores = metrics.evaluate(prob.data >= 0.5, truth, volume.spacing)
            for key in ("dice", "sensitivity", "precision", "hd95"):
                row[f"{name}_{key}"] = scores[key]
        if args.sklearn_baseline or not args.skip_speed:
            prepared = prepare_prior_input(volume, brain)
        if args.sklearn_baseline:
            row["sk_dice"] = sklearn_baseline_dice(
                prepared.channels[0][prepared.brain_mask], prepared.brain_mask, truth, volume.spacing
            )
        if not args.skip_speed:
            row.update(gmm_speed(prepared.channels[0][prepared.brain_mask], 4, args.speed_iters))
        rows.append(row)
        if not args.speed_only:
            print(f"{source}/{row['case']}: gmm dice {row['gmm_dice']:.4f}  ms dice {row['ms_dice']:.4f}", flush=True)

    import torch

    print()
    print(f"# priors benchmark, {date.today().isoformat()}, {platform.node()} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), "
          f"Mumford-Shah device {args.device}")
    flags = " --speed-only" if args.speed_only else (" --skip-speed" if args.skip_speed else "")
    flags += " --sklearn-baseline" if args.sklearn_baseline else ""
    print(f"# command: python benchmarks/priors.py --speed-iters {args.speed_iters} --device {args.device}{flags}")
    print()
    if not args.speed_only:
        print_quality(rows)
    if not args.skip_speed:
        print_speed(rows, args.speed_iters)
    return 0


def print_quality(rows: list[dict[str, object]]) -> None:
    """The per-case and mean quality table."""
    baseline = "sk_dice" in rows[0]
    extra = " sklearn GMM(4) Dice |" if baseline else ""
    print("| source | case | GMM Dice | GMM sens | GMM HD95 mm | MS Dice | MS sens | MS HD95 mm |" + extra)
    print("|---|---|---|---|---|---|---|---|" + ("---|" if baseline else ""))
    for row in rows:
        print(f"| {row['source']} | {row['case']} | {row['gmm_dice']:.4f} | {row['gmm_sensitivity']:.4f} | "
              f"{row['gmm_hd95']:.2f} | {row['ms_dice']:.4f} | {row['ms_sensitivity']:.4f} | "
              f"{row['ms_hd95']:.2f} |"
              + (f" {row['sk_dice']:.4f} |" if baseline else ""))
    for source in SOURCES:
        group = [r for r in rows if r["source"] == source]
        if group:
            def mean_sd(key: str) -> str:
                values = [float(r[key]) for r in group]  # type: ignore[arg-type]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return f"{statistics.mean(values):.4f} ± {sd:.4f}"
            print(f"| {source} | **mean ± sd** | {mean_sd('gmm_dice')} | {mean_sd('gmm_sensitivity')} | "
                  f"{mean_sd('gmm_hd95')} | {mean_sd('ms_dice')} | {mean_sd('ms_sensitivity')} | "
                  f"{mean_sd('ms_hd95')} |" + (f" {mean_sd('sk_dice')} |" if baseline else ""))


def print_speed(rows: list[dict[str, object]], speed_iters: int) -> None:
    """The GMM speed table."""
    print()
    print(f"GMM speed: histogram EM vs sklearn GaussianMixture, K=4, {speed_iters} EM iterations, "
          "same binned voxels, same start, tol=0")
    print()
    print("| case | voxels | bins | sklearn s | hist EM ms | histogram ms | ratio (EM) | ratio (EM+histogram) | LL rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {int(row['voxels'])} | {int(row['bins'])} | {row['t_sklearn']:.2f} | "
              f"{1e3 * row['t_em']:.2f} | {1e3 * row['t_hist']:.1f} | {row['ratio_em']:.0f}x | "
              f"{row['ratio_total']:.0f}x | {row['ll_rel_diff']:.1e} |")
    ratios = [float(r["ratio_em"]) for r in rows]  # type: ignore[arg-type]
    totals = [float(r["ratio_total"]) for r in rows]  # type: ignore[arg-type]
    print(f"| **min / median** | | | | | | {min(ratios):.0f}x / {statistics.median(ratios):.0f}x | "
          f"{min(totals):.0f}x / {statistics.median(totals):.0f}x | "
          f"max {max(float(r['ll_rel_diff']) for r in rows):.1e} |")  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
