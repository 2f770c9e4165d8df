"""Benchmark of the built-in priors on the 16 real cases in ../shared/data.

Sources (see ../shared/data/SOURCES.md): six z-scored BraTS 2015 FLAIR with their
``brainmask``; five raw BraTS 2021/2018 FLAIR (int16, not normalised) with the derived
(non-zero) brain mask; five clinical WMH FLAIR (``t2flair-stripped``, 0.47x0.47x8 mm) with the
derived mask. For every case and every built-in prior (:data:`cgc_refine.priors.BUILTIN_PRIORS`
except ``auto``, which names one of them): Dice, sensitivity, precision and HD95 (mm) of the
prior thresholded at 0.5, its label-free diagnostics (marked volume, components, warnings),
and its time. On the raw BraTS 2021 cases the network prediction ``_pred`` is scored too, as
an external prior read with ``FilePrior(..., on_image_grid=True)`` (its affine was lost).
Means ± sd are per source; the "all" line averages the three source means, which is how
``auto`` is chosen.

Ground truth is read only to score. Optionally (``--speed``) the GMM speed test of issue 2:
histogram EM against ``sklearn.mixture.GaussianMixture`` on the same binned voxels.

Usage::

    python benchmarks/priors.py [--data ../shared/data] [--priors gmm outlier ...]
        [--device cpu] [--sklearn-baseline] [--speed [--speed-iters 20]] [--json rows.json]

The tables printed at the end are what ``benchmarks/RESULTS.md`` records.
"""

from __future__ import annotations

import argparse
import json
import logging
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
from cgc_refine.brain import derive_brain_mask  # noqa: E402
from cgc_refine.priors import BUILTIN_PRIORS, FilePrior, make_prior, prior_diagnostics  # noqa: E402
from cgc_refine.priors.base import prepare_prior_input  # noqa: E402
from cgc_refine.priors.gmm import (  # noqa: E402
    fit_histogram_gmm,
    intensity_histogram,
    kmeans_initialisation,
)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
#: source folder -> (short label, find_subjects patterns). Raw BraTS 2021 and 2018 are one source.
SOURCES: dict[str, tuple[str, dict[str, object]]] = {
    "deepmedic_brats2015": ("z-scored BraTS", dict(PRESETS["brats-deepmedic"])),
    "brats2021_3dbrainthesis": ("raw BraTS", {"images": ("*_flair.nii.gz",), "truth": "*_seg.nii.gz",
                                              "extra": {"pred": "*_pred.nii.gz"}}),
    "brats2018_deepbrainseg": ("raw BraTS", {"images": ("*_flair.nii.gz",), "truth": "*_seg.nii.gz"}),
    "wmh_vbnet_clinical": ("WMH", dict(PRESETS["wmh-vbnet"])),
}
GROUPS = ("z-scored BraTS", "raw BraTS", "WMH")


def real_cases(root: Path) -> list[tuple[str, object]]:
    """(source label, subject) for every real case found under ``root``."""
    cases = []
    for folder, (label, patterns) in SOURCES.items():
        if (root / folder).is_dir():
            for subject in find_subjects(root / folder, **patterns):  # type: ignore[arg-type]
                cases.append((label, subject))
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
    parser.add_argument("--priors", nargs="+", default=[n for n in BUILTIN_PRIORS if n != "auto"],
                        help="built-in priors to score (default: all)")
    parser.add_argument("--device", default="cpu", help="device of the Mumford-Shah prior")
    parser.add_argument("--sources", nargs="+", default=list(GROUPS), help="source groups to run")
    parser.add_argument("--speed", action="store_true", help="also run the GMM speed test")
    parser.add_argument("--speed-only", action="store_true", help="only the GMM speed test")
    parser.add_argument("--skip-speed", action="store_true",
                        help="accepted for older command lines (the speed test is off unless --speed)")
    parser.add_argument("--speed-iters", type=int, default=20, help="EM iterations for the speed test")
    parser.add_argument("--sklearn-baseline", action="store_true",
                        help="also score plain sklearn GaussianMixture(4), brightest component > 0.5")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-case rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.speed_only:
        args.priors, args.speed = [], True

    cases = [(g, s) for g, s in real_cases(args.data) if g in args.sources]
    if not cases:
        print(f"no real cases under {args.data}; nothing to benchmark")
        return 1
    rows = []
    for group, subject in cases:
        volume = load_volume(subject.images)  # type: ignore[attr-defined]
        truth = load_mask(subject.truth, reference=volume)  # type: ignore[attr-defined]
        if subject.brain_mask:  # type: ignore[attr-defined]
            brain = load_mask(subject.brain_mask, reference=volume)  # type: ignore[attr-defined]
        else:
            brain = derive_brain_mask(volume.data)
        row: dict[str, object] = {"source": group, "case": subject.name}  # type: ignore[attr-defined]
        named = [(name, make_prior(name, device=args.device)) for name in args.priors]
        if "pred" in subject.extra and not args.speed_only:  # type: ignore[attr-defined]
            pred = subject.extra["pred"]  # type: ignore[attr-defined]
            named.append(("pred", FilePrior(pred, on_image_grid=True)))
        for name, prior in named:
            tick = time.perf_counter()
            prob = prior.compute(volume, brain)
            row[f"{name}_seconds"] = time.perf_counter() - tick
            scores = metrics.evaluate(prob.data >= 0.5, truth, volume.spacing)
            for key in ("dice", "sensitivity", "precision", "hd95"):
                row[f"{name}_{key}"] = scores[key]
            diag = prior_diagnostics(prob, brain, volume.spacing, log=False)
            row[f"{name}_ml"] = diag["volume_ml"]
            row[f"{name}_components"] = diag["n_components"]
            row[f"{name}_warnings"] = len(diag["warnings"])
            decision = prob.params.get("foreground_decision")
            if isinstance(decision, dict):
                row[f"{name}_fallback"] = bool(decision.get("fallback"))
        if args.sklearn_baseline or args.speed:
            prepared = prepare_prior_input(volume, brain)
        if args.sklearn_baseline:
            row["sk_dice"] = sklearn_baseline_dice(
                prepared.channels[0][prepared.brain_mask], prepared.brain_mask, truth, volume.spacing
            )
        if args.speed:
            row.update(gmm_speed(prepared.channels[0][prepared.brain_mask], 4, args.speed_iters))
        rows.append(row)
        print(f"{group}/{row['case']}: " + "  ".join(
            f"{name} {row[name + '_dice']:.4f}" for name, _ in named), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=float))

    import torch

    print()
    print(f"# priors benchmark, {date.today().isoformat()}, {platform.node()} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), "
          f"Mumford-Shah device {args.device}")
    flags = " --speed-only" if args.speed_only else (" --speed" if args.speed else "")
    flags += " --sklearn-baseline" if args.sklearn_baseline else ""
    speed_iters = f" --speed-iters {args.speed_iters}" if args.speed else ""
    print(f"# command: python benchmarks/priors.py --device {args.device}{speed_iters}{flags}")
    print()
    names = [n for n in args.priors] + (["pred"] if any("pred_dice" in r for r in rows) else [])
    if names:
        print_quality(rows, names)
    if args.speed:
        print_speed(rows, args.speed_iters)
    return 0


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def print_quality(rows: list[dict[str, object]], names: list[str]) -> None:
    """Per-case Dice table, then per-source mean ± sd of Dice, sensitivity and precision."""
    print("Dice of each prior (p >= 0.5); [n] = diagnostics warnings; * = GMM fell back to the outlier rule")
    print()
    print("| source | case | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for row in rows:
        cells = []
        for name in names:
            if f"{name}_dice" not in row:
                cells.append("")
                continue
            cell = f"{float(row[name + '_dice']):.3f}"  # type: ignore[arg-type]
            if row.get(f"{name}_fallback"):
                cell += "*"
            if row.get(f"{name}_warnings"):
                cell += f" [{row[name + '_warnings']}]"
            cells.append(cell)
        print(f"| {row['source']} | {row['case']} | " + " | ".join(cells) + " |")
    print()
    print("| source | metric | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    source_means: dict[str, dict[str, float]] = {}
    for group in GROUPS:
        members = [r for r in rows if r["source"] == group]
        if not members:
            continue
        for metric in ("dice", "sensitivity", "precision", "seconds"):
            cells = []
            for name in names:
                key = f"{name}_{metric}"
                values = [float(r[key]) for r in members if key in r]  # type: ignore[arg-type]
                cells.append(_mean_sd(values) if values else "")
                if metric == "dice" and values:
                    source_means.setdefault(name, {})[group] = statistics.mean(values)
            label = "**Dice**" if metric == "dice" else metric
            print(f"| {group} (n={len(members)}) | {label} | " + " | ".join(cells) + " |")
    cells = []
    for name in names:
        means = source_means.get(name, {})
        cells.append(f"{statistics.mean(means.values()):.3f}" if len(means) == len(
            [g for g in GROUPS if any(r["source"] == g for r in rows)]) else "")
    print("| **mean of source means** | **Dice** | " + " | ".join(cells) + " |")


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
