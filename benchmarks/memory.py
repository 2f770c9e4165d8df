"""Peak resident memory of a fit as the cohort grows (issue: memory stays bounded).

Writes synthetic 240x240x155 FLAIR-like phantoms as NIfTI files (once, into ``--work``),
then fits ``Refiner("gmm", RefinerConfig.fast(iterations=N))`` on the first 10 and on all 40
of them, each fit in a fresh child process, with and without ``cache_dir``, and prints the
peak resident set size of every child (``resource.getrusage(RUSAGE_SELF).ru_maxrss`` read by
the child at its end; data-loader workers, if any, are reported separately) and the ratios.

Usage::

    python benchmarks/memory.py                     # 10 vs 40 volumes, 240x240x155, 20 iterations
    python benchmarks/memory.py --sizes 3 12 --shape 160 160 100   # the CI-sized version
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_cohort(folder: Path, count: int, shape: tuple[int, int, int]) -> list[Path]:
    """``count`` phantom FLAIR files in ``folder`` (existing ones of the same shape are reused)."""
    import numpy as np

    from cgc_refine.io import save_array
    from cgc_refine.phantom import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    tag = "x".join(str(s) for s in shape)
    paths = []
    for index in range(count):
        path = folder / f"phantom_{tag}_{index:03d}.nii.gz"
        if not path.is_file():
            phantom = make_phantom(shape, n_lesions=4, seed=index, spacing=(1.0, 1.0, 1.0))
            save_array(phantom.volume.data[0], phantom.volume, path, np.float32)
        paths.append(path)
    return paths


def child(paths: list[str], cache_dir: str | None, iterations: int, workers: int) -> dict[str, float]:
    """Fit in this process and report its peak memory (run by :func:`measure`)."""
    import torch

    from cgc_refine import Refiner, RefinerConfig

    torch.set_num_threads(1)
    config = RefinerConfig.fast(iterations=iterations, num_workers=workers)
    started = time.perf_counter()
    refiner = Refiner("gmm", config=config, device="cpu").fit(paths, cache_dir=cache_dir)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"peak_rss_mib": usage.ru_maxrss / 1024.0, "workers_peak_rss_mib": children.ru_maxrss / 1024.0,
            "fit_s": time.perf_counter() - started, "subjects": len(paths), "n_iter": refiner.n_iter_}


def measure(paths: list[Path], cache_dir: Path | None, iterations: int, workers: int = 0) -> dict[str, float]:
    """Run :func:`child` in a fresh Python process and return what it reports."""
    spec = {"paths": [str(p) for p in paths], "cache_dir": None if cache_dir is None else str(cache_dir),
            "iterations": iterations, "workers": workers}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the measured fit failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=(10, 40), metavar=("SMALL", "LARGE"))
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cgc_refine_memory")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fits without cache_dir")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["paths"], spec["cache_dir"], spec["iterations"], spec["workers"])))
        return 0

    small, large = args.sizes
    shape = tuple(args.shape)
    tick = time.perf_counter()
    paths = write_cohort(args.work / "volumes", large, shape)  # type: ignore[arg-type]
    print(f"# memory benchmark, {date.today().isoformat()}, {platform.node()} ({platform.machine()}), "
          f"{large} phantoms {shape} written/reused in {time.perf_counter() - tick:.0f} s")
    print(f"# command: python benchmarks/memory.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    rows = []
    modes = [("cache_dir", True)] + ([] if args.no_baseline else [("in memory (no cache_dir)", False)])
    for label, cached in modes:
        peaks = {}
        for count in (small, large):
            cache = None
            if cached:
                cache = Path(tempfile.mkdtemp(prefix=f"cache{count}_", dir=args.work))
            peaks[count] = measure(paths[:count], cache, args.iterations)
        ratio = peaks[large]["peak_rss_mib"] / peaks[small]["peak_rss_mib"]
        rows.append((label, peaks[small], peaks[large], ratio))
    print()
    print(f"| fit | peak RSS, {small} volumes (MiB) | peak RSS, {large} volumes (MiB) | ratio {large}/{small} |")
    print("|---|---|---|---|")
    for label, a, b, ratio in rows:
        print(f"| {label} | {a['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | {ratio:.3f} |")
    print(f"\n(each fit: GMM prior, RefinerConfig.fast, {args.iterations} iterations, CPU, fresh process; "
          "fresh cache folder per cached fit)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
