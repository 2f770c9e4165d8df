"""Per-case figures on the real data: image with prior, refined and truth contours, and a Dice plot.

For each real case (six BraTS gliomas, five clinical WMH) the GMM prior is computed, refined
by a single-subject fit (the CPU ``--fast`` configuration unless ``--full``), and drawn with
:func:`cgc_refine.report.render_montage` on the slices with the most lesion. A last figure
plots the Dice of prior and refined mask per case. Ground truth is read only to score and to
draw its contour. Figures go to ``benchmarks/results/``; the table printed last is what
``benchmarks/RESULTS.md`` records.

Usage::

    python benchmarks/figures.py [--full] [--device auto] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cgc_refine.config import RefinerConfig  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.metrics import dice  # noqa: E402
from cgc_refine.priors import GMMPrior  # noqa: E402
from cgc_refine.refiner import Refiner  # noqa: E402
from cgc_refine.report import render_montage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from priors import DEFAULT_DATA, real_cases  # noqa: E402


def dice_plot(rows: list[tuple[str, float, float]], path: Path) -> None:
    """Grouped bars: prior vs refined Dice per case (matplotlib, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [r[1] for r in rows], width=0.4, label="GMM prior", color="#d9a400")
    axes.bar([p + 0.2 for p in positions], [r[2] for r in rows], width=0.4, label="refined", color="#c0392b")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("Dice")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--full", action="store_true", help="the paper's configuration (GPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    config = RefinerConfig() if args.full else RefinerConfig.fast()
    rows = []
    device_name = "cpu"
    for source, subject in real_cases(args.data):
        volume = load_volume(subject.images)  # type: ignore[attr-defined]
        truth = load_mask(subject.truth, reference=volume)  # type: ignore[attr-defined]
        brain = load_mask(subject.brain_mask, reference=volume) if subject.brain_mask else None  # type: ignore[attr-defined]
        prior = GMMPrior().compute(volume, brain)
        refiner = Refiner([prior], config=config, device=args.device, random_state=args.seed)
        refined = refiner.fit([volume], brain_masks=[brain]).predict(volume, brain)
        device_name = str(refiner.device_)
        name = subject.name.replace("brats_2013_", "")  # type: ignore[attr-defined]
        before, after = dice(prior.data >= 0.5, truth), dice(refined, truth)
        rows.append((name, before, after))
        render_montage(
            volume, args.out / f"{name}.png", prior=prior.data, refined=refined, truth=truth,
            title=f"{name}: GMM prior Dice {before:.3f}, refined {after:.3f}", overwrite=True,
        )
        print(f"{source}/{name}: prior {before:.4f} refined {after:.4f}", flush=True)
    dice_plot(rows, args.out / "dice_per_case.png")
    card = torch.cuda.get_device_name(0) if device_name.startswith("cuda") else "CPU"
    mode = "full configuration" if args.full else "reduced CPU mode (RefinerConfig.fast), single-subject fits"
    print()
    print(f"# per-case figures, {date.today().isoformat()}, {card}, {mode}, seed {args.seed}")
    print(f"# command: python benchmarks/figures.py{' --full' if args.full else ''} --device {args.device}")
    print()
    print("| case | GMM prior Dice | refined Dice | figure |")
    print("|---|---|---|---|")
    for name, before, after in rows:
        print(f"| {name} | {before:.4f} | {after:.4f} | results/{name}.png |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
