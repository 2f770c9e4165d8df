"""``cgc-refine demo``: a synthetic phantom end to end, with the Dice before and after."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ..workflow.demo import DEMO_NOISE, DEMO_SHAPE
from .console import ConsoleProgress, sub_logging, wrote
from .options import build_config, common_options, device_options, report_option, run_options

__all__ = ["DEMO_ITERATIONS", "demo_command"]

#: Training iterations of the demo (a phantom needs fewer than a real image).
DEMO_ITERATIONS = 100


@click.command("demo")
@click.option("--iterations", type=click.IntRange(min=1), default=DEMO_ITERATIONS, show_default=True,
              help="Training iterations.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed of phantom and training, 0 to 2**32-1.")
@click.option("--fast/--full", default=True, show_default=True,
              help="Reduced network (CPU friendly) or the paper's network.")
@click.option("--shape", type=click.IntRange(min=8), nargs=3, default=DEMO_SHAPE, hidden=True,
              help="Advanced: phantom grid size.")
@click.option("--crop-size", type=click.IntRange(min=1), nargs=3, default=None, hidden=True,
              help="Advanced: training crop size (voxels).")
@report_option
@device_options
@common_options(output_help="Folder for the phantom, its prior and the refined mask "
                            "(created if missing; nothing is written without -o).")
@click.pass_context
def demo_command(
    ctx: click.Context, iterations: int, seed: int, fast: bool, shape: Sequence[int],
    crop_size: Sequence[int] | None, report: bool, device: str, output: str | None, overwrite: bool,
    quiet: bool, verbose: int, threads: int | None = None,
) -> None:
    """Refine the GMM prior of a synthetic phantom and print the Dice before and after.

    Synthetic phantoms exercise the code; they say nothing about accuracy on real data.
    """
    from ..workflow.demo import run_demo

    quiet, _ = sub_logging(ctx, quiet, verbose)
    folder = Path(output) if output else None
    if report and folder is None:
        raise click.UsageError("--report needs -o FOLDER (the demo writes nothing without it)", ctx=ctx)
    config = build_config(fast=fast, config_file=None,
                          values={"iterations": iterations, "crop_size": crop_size})
    options = run_options(ctx, {"seed": seed, "device": device, "threads": threads, "overwrite": overwrite})
    result = run_demo(config, shape=tuple(shape), folder=folder, report=report,  # type: ignore[arg-type]
                      options=options, progress=ConsoleProgress.for_console(quiet))
    click.echo(f"synthetic phantom {'x'.join(str(s) for s in shape)}, "
               f"{result.lesion_voxels} lesion voxels, noise {DEMO_NOISE}; "
               f"{config.iterations} iterations on {result.device}")
    click.echo("(a synthetic phantom exercises the pipeline; it says nothing about accuracy on real data)")
    click.echo(f"prior Dice (GMM):  {result.prior_dice:.3f}")
    click.echo(f"refined Dice:      {result.refined_dice:.3f}")
    if not quiet:
        times = result.timings
        click.echo(f"time: prior {times['prior_s']:.1f} s, training {times['train_s']:.1f} s, "
                   f"inference {times['inference_s']:.1f} s")
    wrote(quiet, result.written)
