"""``python -m cgc_refine`` runs the command line (what ``torchrun -m cgc_refine`` launches)."""

from .cli import main

if __name__ == "__main__":
    main()
