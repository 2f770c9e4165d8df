"""The ``--fast`` command on a busy machine: wall time beside another CPU-heavy process.

Runs, as a subprocess of the installed console script, on one real BraTS case::

    cgc-refine --prior gmm --image <FLAIR> --fast --device cpu -o <out>/ --seed 0

first on the machine as it is (nothing else of ours running), then once for each competitor
while that competitor keeps running: ``spin`` is one single-threaded busy loop (another user's
script), ``torch`` is a process multiplying matrices with torch's default thread count (another
user's training job). It prints each wall time, the ratio to the idle run and the CPU thread
count the command chose (from its sidecar). The ratios are measured in one run of this script;
the absolute seconds depend on the machine.

Usage::

    python benchmarks/contention.py [--case brats_2013_pat0003_1] [--competitors spin torch]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepmedic_brats2015"

COMPETITORS = {
    "spin": "while True:\n    pass\n",
    "torch": (
        "import torch\n"
        "a = torch.randn(1024, 1024)\n"
        "while True:\n"
        "    a = torch.tanh(a @ a / 32.0)\n"
    ),
}


def timed_refine(executable: str, flair: Path, out: Path) -> tuple[float, int | None]:
    """Run the ``--fast`` command once; return its wall time and the threads it recorded."""
    out.mkdir(parents=True, exist_ok=True)
    command = [executable, "--prior", "gmm", "--image", str(flair), "--fast", "--device", "cpu",
               "-o", str(out) + os.sep, "--seed", "0", "--overwrite", "-q"]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - start
    threads = None
    for sidecar in out.glob("*_label-lesion_mask.json"):
        facts = json.loads(sidecar.read_text())
        threads = facts.get("threads", facts.get("run", {}).get("threads"))
    return seconds, threads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--case", default="brats_2013_pat0003_1")
    parser.add_argument("--competitors", nargs="+", choices=sorted(COMPETITORS), default=["spin", "torch"])
    args = parser.parse_args(argv)
    executable = shutil.which("cgc-refine")
    if executable is None:
        print("cgc-refine is not installed (pip install .)")
        return 1
    flair = args.data / args.case / "Flair_subtrMeanDivStd.nii.gz"
    root = Path(tempfile.mkdtemp(prefix="cgc_contention_"))
    idle, idle_threads = timed_refine(executable, flair, root / "idle")
    rows = [("none (idle)", idle, idle_threads, 1.0)]
    print(f"idle: {idle:.0f} s, threads {idle_threads}", flush=True)
    for name in args.competitors:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[name]])
        try:
            time.sleep(3.0)  # let it get going, as a job that was already running
            busy, threads = timed_refine(executable, flair, root / name)
        finally:
            competitor.kill()
            competitor.wait()
        rows.append((name, busy, threads, busy / idle))
        print(f"{name}: {busy:.0f} s, threads {threads}, {busy / idle:.2f}x idle", flush=True)
    print()
    print(f"# cgc-refine --prior gmm --fast --device cpu on {args.case}, {date.today().isoformat()}, "
          f"{platform.node()} ({os.cpu_count()} cores), OMP_NUM_THREADS unset")
    print("| other process running | wall s | threads chosen | time / idle time |")
    print("|---|---|---|---|")
    for name, seconds, threads, ratio in rows:
        print(f"| {name} | {seconds:.0f} | {threads} | {ratio:.2f} |")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
