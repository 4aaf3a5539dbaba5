"""`python -m lowrank ARGS…` runs the command line, as the `lowrank` script does (e.g. under torchrun)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
