"""``cgc-refine prior NAME``: write a built-in prior as a probability map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from ..config import LESION_PATTERNS
from ..priors import BUILTIN_PRIORS
from .console import ConsoleProgress, sub_logging, wrote
from .options import common_options, device_options, modality_option, run_options
from .outputs import resolve_output

__all__ = ["prior_command"]


@click.command("prior")
@click.argument("name", type=click.Choice(BUILTIN_PRIORS))
@click.option("--image", "images", multiple=True, required=True, metavar="IMG",
              help="Image file; repeat for several modalities, the lesion-bright one first.")
@click.option("--brain-mask", default=None, metavar="MASK", help="Brain mask (default: derived).")
@click.option("--cleanup", type=click.Choice(LESION_PATTERNS), default="auto", show_default=True,
              help="Clean the prior up (closing, hole filling, component filtering) for this lesion "
                   "pattern: focal, multifocal or auto (decided from the prior), as the single-subject "
                   "command cleans its training target; none writes the prior as computed.")
@modality_option
@device_options
@common_options(output_help="Output prior file (.nii.gz) or folder "
                            "(default: <stem>_label-lesion_desc-NAME_probseg.nii.gz next to the image).")
@click.pass_context
def prior_command(
    ctx: click.Context, name: str, images: Sequence[str], brain_mask: str | None, modality: str,
    device: str, output: str | None, overwrite: bool, quiet: bool, verbose: int,
    threads: int | None = None, cleanup: str = "auto",
) -> None:
    """Compute a built-in prior (auto, gmm, outlier, mumford-shah...) and write it as a float32 map."""
    from ..workflow import compute_prior

    quiet, _ = sub_logging(ctx, quiet, verbose)
    image_paths = [Path(p) for p in images]
    out_path = resolve_output(image_paths[0], output, f"label-lesion_desc-{name}_probseg")
    options = run_options(ctx, {"device": device, "threads": threads, "overwrite": overwrite,
                                "modality": modality})
    written = compute_prior(name, image_paths, out_path, brain_mask=brain_mask, cleanup=cleanup,
                            options=options, progress=ConsoleProgress(False, quiet=quiet))
    wrote(quiet, written)
