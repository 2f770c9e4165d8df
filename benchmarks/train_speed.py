"""Training-step speed: the toolkit's step against a plain fp32 eager PyTorch loop.

Both loops train the same network (the default CGC U-Net, 32-64-128-256) on the same random
batch ``2 x C x 192 x 192 x 64`` with the same loss and Adam; they differ only in how the step
runs:

* baseline -- PyTorch defaults: fp32, contiguous (NCDHW) layout, eager;
* cgc_refine -- :func:`cgc_refine.training.training_step` as ``fit`` runs it: channels-last
  layout, bf16 autocast on CUDA, and ``torch.compile`` of ``forward_train`` with ``--compile``.

Both are timed in this one run (median of ``--steps`` steps after ``--warmup`` steps, with CUDA
synchronisation); the ratio is what we report. The achieved TFLOP/s uses the FLOPs of one
training step counted by ``torch.utils.flop_counter.FlopCounterMode``.

Without CUDA the script runs a reduced CPU mode (8-16-32-64 network, 2 x C x 64 x 64 x 32,
no autocast) -- its figures say nothing about the GPU target.

Usage::

    python benchmarks/train_speed.py [--channels 1] [--steps 20] [--warmup 5] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cgc_refine.config import RefinerConfig  # noqa: E402
from cgc_refine.model import CGCLoss  # noqa: E402
from cgc_refine.training import _TrainForward, build_network, training_step  # noqa: E402


def plain_step(model, loss_fn, optimizer, batch):  # type: ignore[no-untyped-def]
    """The baseline: what a plain PyTorch loop does with default settings."""
    image, prior, brain = batch
    output = model.forward_train(image)
    total, parts = loss_fn(output, prior, brain)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    return parts


def time_steps(step, n_warmup: int, n_steps: int, device: torch.device) -> list[float]:  # type: ignore[no-untyped-def]
    for _ in range(n_warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(n_steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def count_flops(model, loss_fn, batch) -> float:  # type: ignore[no-untyped-def]
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        output = model.forward_train(batch[0])
        total, _ = loss_fn(output, batch[1], batch[2])
        total.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(channels: int = 1, steps: int = 20, warmup: int = 5, compile_step: bool = False) -> dict:
    """Time both loops on this machine's best device; return the rows and the settings."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        config = RefinerConfig(compile=compile_step).validate()
        shape = (2, channels, 192, 192, 64)
        torch.backends.cudnn.benchmark = True
    else:
        config = RefinerConfig.fast(crop_size=(64, 64, 32)).validate()
        shape = (2, channels, 64, 64, 32)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=generator)
    prior = (torch.rand((shape[0], 1, *shape[2:]), generator=generator) > 0.8).float()
    brain = torch.ones_like(prior, dtype=torch.bool)
    batch = tuple(t.to(device) for t in (image, prior, brain))
    loss_fn = CGCLoss(config.lambda_cg, config.lambda_fg, config.temperature)
    rows = []

    torch.manual_seed(0)
    baseline = build_network(config, channels).to(device)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=config.learning_rate)
    flops = count_flops(baseline, loss_fn, batch)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(lambda: plain_step(baseline, loss_fn, optimizer, batch), warmup, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    rows.append(("plain fp32 eager (PyTorch defaults)", statistics.median(times), peak))
    del baseline, optimizer

    torch.manual_seed(0)
    network = build_network(config, channels).to(device).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    model = torch.compile(_TrainForward(network)) if (compile_step and cuda) else network
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(
        lambda: training_step(model, loss_fn, optimizer, batch, device, config.amp), warmup, steps, device
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    label = "cgc_refine step (channels-last" + (", bf16 autocast" if cuda and config.amp else "") + (
        ", torch.compile" if compile_step and cuda else "") + ")"
    rows.append((label, statistics.median(times), peak))
    card = torch.cuda.get_device_name(0) if cuda else "CPU (reduced mode, no CUDA)"
    return {"rows": rows, "flops": flops, "shape": shape, "config": config, "card": card}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=1, help="image channels C")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the cgc_refine step (CUDA)")
    args = parser.parse_args(argv)
    result = measure(args.channels, args.steps, args.warmup, args.compile)
    rows, flops, shape, config = result["rows"], result["flops"], result["shape"], result["config"]
    print()
    print(f"# training-step speed, {date.today().isoformat()}, {result['card']}, torch {torch.__version__}, "
          f"batch {'x'.join(map(str, shape))}, widths {list(config.channels)}")
    print(f"# command: python benchmarks/train_speed.py --channels {args.channels} --steps {args.steps}"
          f" --warmup {args.warmup}{' --compile' if args.compile else ''}")
    print(f"# FLOPs per training step (forward + backward, FlopCounterMode): {flops / 1e12:.3f} TFLOP")
    print()
    print("| step | median ms | TFLOP/s | peak GPU memory GiB | speed-up vs baseline |")
    print("|---|---|---|---|---|")
    base_time = rows[0][1]
    for name, seconds, peak in rows:
        print(f"| {name} | {1e3 * seconds:.1f} | {flops / seconds / 1e12:.2f} | {peak:.2f} | {base_time / seconds:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
