"""The speed suite: every figure a ratio measured in this one run, or a time with its card.

Sections (each printed as one table row at the end):

1. training step -- the toolkit's step against a plain fp32 eager loop of the same model
   (``train_speed.measure``; GPU: 32-64-128-256 network, 2x1x192x192x64 batch; CPU: the
   reduced 8-16-32-64 network on 2x1x64x64x32);
2. GMM prior -- histogram EM against ``sklearn.mixture.GaussianMixture`` on the same binned
   brain voxels of one real FLAIR, same start, equal iterations (``priors.gmm_speed``);
3. Mumford-Shah prior -- time of ``MumfordShahPrior().compute`` on that case (GPU when present);
4. sliding-window inference on a 240x240x155 volume -- the refiner's inference settings
   (bf16 autocast on CUDA, channels-last, Gaussian blending) against plain fp32 eager windows
   of the same network and window; random weights (speed does not depend on them);
5. end-to-end ``cgc-refine --prior gmm --image FLAIR`` (prior + fit + predict + write) as a
   subprocess: the full configuration on the GPU when there is one, and ``--fast`` on the CPU;
6. peak GPU memory of 1 and 4.

Usage::

    python benchmarks/speed.py [--case DIR] [--skip-cli] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cgc_refine.config import RefinerConfig  # noqa: E402
from cgc_refine.inference import sliding_window_predict  # noqa: E402
from cgc_refine.io import load_volume  # noqa: E402
from cgc_refine.priors import MumfordShahPrior  # noqa: E402
from cgc_refine.priors.base import prepare_prior_input  # noqa: E402
from cgc_refine.training import build_network  # noqa: E402

DEFAULT_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepmedic_brats2015" / "brats_2013_pat0001_1"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference_speed(config: RefinerConfig, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of sliding-window inference on 1x1x240x240x155: ours vs plain fp32."""
    torch.manual_seed(0)
    network = build_network(config, 1).to(device).eval()
    volume = torch.randn(1, 1, 240, 240, 155)
    window = config.inference_window or config.crop_size
    results = {}
    settings = {
        "plain": dict(autocast_dtype=None, channels_last=False),
        "ours": dict(autocast_dtype=torch.bfloat16 if (device.type == "cuda" and config.amp) else None,
                     channels_last=True),
    }
    for name, setting in settings.items():
        model = network.to(memory_format=torch.channels_last_3d) if setting["channels_last"] else network
        inputs = volume.to(device)
        if setting["channels_last"]:
            inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for attempt in range(repeats + 1):  # the first call warms up (cuDNN autotuning)
            _sync(device)
            tick = time.perf_counter()
            with torch.no_grad():
                sliding_window_predict(inputs, model, window, overlap=config.overlap,
                                       sw_batch_size=config.sw_batch_size, mode="gaussian", sw_device=device,
                                       device=torch.device("cpu"), autocast_dtype=setting["autocast_dtype"])
            _sync(device)
            if attempt:
                times.append(time.perf_counter() - tick)
        results[name] = statistics.median(times)
        results[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    results["window"] = window
    return results


def cli_time(flair: Path, fast: bool, device: str) -> float:
    """Wall seconds of one ``cgc-refine --prior gmm`` run (prior, fit, predict, write)."""
    executable = shutil.which("cgc-refine")
    if executable is None:
        raise RuntimeError("cgc-refine is not installed (pip install .)")
    out = Path(tempfile.mkdtemp(prefix="cgc_speed_cli_"))
    command = [executable, "--prior", "gmm", "--image", str(flair), "--device", device, "-o", str(out) + os.sep,
               "--overwrite", "-q"] + (["--fast"] if fast else [])
    tick = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - tick
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE, help="folder with Flair_subtrMeanDivStd.nii.gz")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed inference passes per setting")
    parser.add_argument("--gmm-iters", type=int, default=100)
    parser.add_argument("--skip-cli", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step (CUDA)")
    args = parser.parse_args(argv)

    import train_speed
    from priors import gmm_speed

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    card = torch.cuda.get_device_name(0) if cuda else f"CPU only ({os.cpu_count()} cores, {platform.node()})"
    rows: list[tuple[str, str, str]] = []

    # 1. training step
    step = train_speed.measure(1, args.steps, 5, args.compile)
    (base_name, base_s, base_peak), (ours_name, ours_s, ours_peak) = step["rows"]
    shape = "x".join(map(str, step["shape"]))
    rows.append((f"training step, batch {shape}, widths {list(step['config'].channels)}",
                 f"{base_s / ours_s:.2f}x ({ours_name} vs {base_name})",
                 f"{1e3 * ours_s:.1f} ms vs {1e3 * base_s:.1f} ms; {step['flops'] / ours_s / 1e12:.2f} TFLOP/s"))

    # 2 + 3. priors on one real FLAIR
    flair_path = args.case / "Flair_subtrMeanDivStd.nii.gz"
    if flair_path.is_file():
        volume = load_volume(flair_path)
        prepared = prepare_prior_input(volume, None, "mri")
        values = prepared.channels[0][prepared.brain_mask]
        speed = gmm_speed(values, 4, args.gmm_iters, repeats=10)
        rows.append((f"GMM prior (K=4, {args.gmm_iters} EM iterations, {int(speed['voxels'])} voxels)",
                     f"{speed['ratio_em']:.0f}x EM, {speed['ratio_total']:.0f}x EM + histogram vs sklearn",
                     f"log-likelihood rel. diff {speed['ll_rel_diff']:.1e}"))
        prior = MumfordShahPrior(device=str(device))
        prior.compute(volume)  # warm-up (CUDA context, kernels)
        _sync(device)
        times = []
        for _ in range(2):
            tick = time.perf_counter()
            prior.compute(volume)
            _sync(device)
            times.append(time.perf_counter() - tick)
        rows.append((f"Mumford-Shah prior on {args.case.name} {volume.shape}", "-",
                     f"{statistics.median(times):.2f} s on {card}"))
    else:
        rows.append(("GMM / Mumford-Shah priors", "skipped", f"{flair_path} not found"))

    # 4. sliding-window inference, 240x240x155
    config = (RefinerConfig() if cuda else RefinerConfig.fast()).validate()
    inference = inference_speed(config, device, args.repeats)
    rows.append((f"sliding-window inference 240x240x155, window {inference['window']}, overlap {config.overlap}, "
                 f"widths {list(config.channels)}",
                 f"{inference['plain'] / inference['ours']:.2f}x (ours vs plain fp32 windows)",
                 f"{inference['ours']:.2f} s vs {inference['plain']:.2f} s on {card}"))

    # 5. end-to-end command
    if not args.skip_cli and flair_path.is_file():
        if cuda:
            seconds = cli_time(flair_path, fast=False, device="cuda")
            rows.append(("cgc-refine --prior gmm (full configuration, 2000 iterations), GPU", "-",
                         f"{seconds:.0f} s on {card}"))
        seconds = cli_time(flair_path, fast=True, device="cpu")
        rows.append(("cgc-refine --prior gmm --fast --device cpu", "-",
                     f"{seconds:.0f} s on {platform.node()} ({os.cpu_count()} CPU cores)"))

    # 6. peak GPU memory
    if cuda:
        rows.append(("peak GPU memory", "-",
                     f"training step {ours_peak:.2f} GiB (plain {base_peak:.2f}); inference {inference['ours_peak_gib']:.2f} "
                     f"GiB (plain {inference['plain_peak_gib']:.2f})"))
    else:
        rows.append(("peak GPU memory", "owed", "no CUDA device in this run"))

    print()
    print(f"# speed suite, {date.today().isoformat()}, {card}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"# command: python benchmarks/speed.py {' '.join(sys.argv[1:]) if argv is None else ' '.join(argv)}")
    print()
    print("| measurement | ratio (same run) | time / notes |")
    print("|---|---|---|")
    for name, ratio, note in rows:
        print(f"| {name} | {ratio} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
