"""The single-subject job on real cases, as a user runs it, in the reduced CPU mode.

For each chosen BraTS case this runs, in a child process, the library function behind the
single-subject command (:func:`cgc_refine.workflow.refine_subject`, what
``cgc-refine --prior gmm --image <FLAIR> --fast --device cpu -o <out>/ --save-proba`` calls),
then :func:`cgc_refine.workflow.compute_prior` (``cgc-refine prior gmm --cleanup none``) for the prior alone,
and scores both masks against the whole tumour (label > 0; the prior as probability > 0.5).
It prints the wall time of the refinement and its peak resident memory (``os.wait4`` of that
child), and the Dice of the prior and of the refined mask. The brain mask is derived by the
job (non-background voxels), as a user without one gets.

Usage::

    python benchmarks/cli_real_case.py [--cases brats_2013_pat0002_1 ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import date
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_refine import RefinerConfig  # noqa: E402
from cgc_refine.io import load_mask, load_volume  # noqa: E402
from cgc_refine.metrics import evaluate  # noqa: E402
from cgc_refine.workflow import RunOptions, SubjectOutputs, compute_prior, refine_subject  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepmedic_brats2015"


def in_child(job: Callable[[], object]) -> tuple[float, float]:
    """Run ``job`` in a forked child; return its wall time (s) and its own peak resident memory (MiB)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: run the job, exit with its status
        code = 0
        try:
            job()
        except BaseException:  # noqa: BLE001 - report and exit non-zero
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the job in child process {pid} failed")
    return seconds, usage.ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", nargs="+", default=["brats_2013_pat0002_1", "brats_2013_pat0001_1"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="cgc_cli_real_"))
    options = RunOptions(device="cpu", overwrite=True)
    rows = []
    for case in args.cases:
        flair = args.data / case / "Flair_subtrMeanDivStd.nii.gz"
        out = out_root / case
        out.mkdir(parents=True, exist_ok=True)
        outputs = SubjectOutputs.next_to(flair, folder=out, probability=True)
        seconds, peak = in_child(partial(refine_subject, [flair], "gmm", outputs, RefinerConfig.fast(),
                                         options=options))
        prior_path = out / "prior_gmm.nii.gz"
        in_child(partial(compute_prior, "gmm", [flair], prior_path, cleanup="none", options=options))
        volume = load_volume(flair)
        truth = load_mask(args.data / case / "OTMultiClass.nii.gz", reference=volume)
        mask = load_mask(outputs.mask, reference=volume)
        prior = load_mask(prior_path, reference=volume)  # probability >= 0.5
        refined = evaluate(mask, truth, volume.spacing)
        before = evaluate(prior, truth, volume.spacing)
        rows.append((case, before["dice"], refined["dice"], seconds, peak))
        print(f"{case}: prior {before['dice']:.4f} refined {refined['dice']:.4f} ({seconds:.0f} s)", flush=True)
    print()
    print(f"# refine_subject (cgc-refine --prior gmm --fast --device cpu) on real cases, "
          f"{date.today().isoformat()}, {platform.node()} ({os.cpu_count()} cores), no other job running")
    print(f"# command: python benchmarks/cli_real_case.py --cases {' '.join(args.cases)}")
    print()
    print("| case | GMM prior Dice | refined Dice | wall time of the job, s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for case, before, after, seconds, peak in rows:
        print(f"| {case} | {before:.4f} | {after:.4f} | {seconds:.0f} | {peak:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
