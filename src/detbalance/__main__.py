"""``python -m detbalance ...`` (and ``torchrun -m detbalance ...``): the command line of :mod:`detbalance.cli`."""

import sys

from detbalance.cli import main

if __name__ == "__main__":
    sys.exit(main())
