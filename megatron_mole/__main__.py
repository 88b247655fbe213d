"""`python -m megatron_mole ...` (and so `torchrun -m megatron_mole ...`) runs the CLI."""
import sys

from megatron_mole.cli import main

if __name__ == "__main__":
    sys.exit(main())
