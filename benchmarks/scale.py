"""Training throughput with 1 and 2 processes (torchrun; gloo on CPU, nccl on GPUs).

For each process count P and each number of data-loader workers W, launches
``torchrun --standalone --nproc_per_node P benchmarks/scale.py --rank-job ...``; every rank
fits ``Refiner("gmm", RefinerConfig.fast(iterations=N, num_workers=W))`` on the same
synthetic phantoms (prepared once into a shared cache) and reports its steps, crops and the
seconds it spent waiting for the next batch. Printed per (P, W): crops per second summed over
ranks (each rank's crops over the slowest rank's loop time), the speed-up over one process
with the same W, and the mean fraction of the loop spent waiting for data.

On a CPU machine each process runs ``--threads`` torch threads (default: cores / P, so that
both settings use the same cores); on GPUs each rank uses its own GPU.

Usage::

    python benchmarks/scale.py                              # P in 1 2, W in 0 1, 60 iterations
    python benchmarks/scale.py --processes 1 2 4 --device cuda
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rank_job(spec: dict) -> None:
    """One rank's fit (run under torchrun by :func:`launch`)."""
    import torch

    from cgc_refine import Refiner, RefinerConfig

    torch.set_num_threads(int(spec["threads"]))
    config = RefinerConfig.fast(iterations=int(spec["iterations"]), num_workers=int(spec["workers"]),
                                log_every=max(1, int(spec["iterations"])))
    refiner = Refiner("gmm", config=config, device=spec["device"]).fit(spec["paths"], cache_dir=spec["cache"])
    rank = int(os.environ.get("RANK", "0"))
    timings = refiner.timings_
    with open(Path(spec["out"]) / f"rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump({key: float(value) for key, value in timings.items()}, handle)


def launch(processes: int, spec: dict, out: Path) -> list[dict]:
    """Run one torchrun job and return every rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    job = {**spec, "out": str(out)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), str(Path(__file__).resolve()), "--rank-job", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun with {processes} process(es) failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 96))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (CPU)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--rank-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_job is not None:
        rank_job(json.loads(args.rank_job))
        return 0

    from memory import write_cohort

    work = args.work or Path(tempfile.mkdtemp(prefix="cgc_scale_"))
    paths = write_cohort(work / "volumes", args.subjects, tuple(args.shape))  # type: ignore[arg-type]
    cache = work / "cache"
    cores = os.cpu_count() or 1
    card = "CPU"
    if args.device.startswith("cuda"):
        import torch

        card = torch.cuda.get_device_name(0)
    print(f"# scale benchmark, {date.today().isoformat()}, {platform.node()}, {cores} CPU cores, {card}, "
          f"{args.subjects} phantoms {tuple(args.shape)}, RefinerConfig.fast, {args.iterations} iterations")
    print(f"# command: python benchmarks/scale.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    # Warm the shared cache once so that every timed job trains from the same entries.
    warm = {"paths": [str(p) for p in paths], "cache": str(cache), "iterations": 1, "workers": 0,
            "device": args.device, "threads": max(1, cores)}
    launch(1, warm, work / "warm")
    rows = []
    for workers in args.workers:
        single = None
        for processes in args.processes:
            threads = args.threads or max(1, cores // processes)
            spec = {**warm, "iterations": args.iterations, "workers": workers, "threads": threads}
            tick = time.perf_counter()
            reports = launch(processes, spec, work / f"p{processes}_w{workers}")
            wall = time.perf_counter() - tick
            loop = max(r["loop_s"] for r in reports)
            samples = sum(r["samples"] for r in reports)
            rate = samples / loop
            wait = sum(r["data_wait_s"] / r["loop_s"] for r in reports) / len(reports)
            single = rate if processes == args.processes[0] else single
            rows.append((processes, workers, threads, rate, rate / single, wait, wall))
    shutil.rmtree(work / "warm", ignore_errors=True)
    print()
    print("| processes | loader workers / process | threads / process | crops/s (all ranks) | "
          "speed-up vs 1 process | data-wait fraction | job wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for processes, workers, threads, rate, speedup, wait, wall in rows:
        print(f"| {processes} | {workers} | {threads} | {rate:.2f} | {speedup:.2f}x | {wait:.3f} | {wall:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
