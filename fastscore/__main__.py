"""``python -m fastscore``: the command line (fastscore.cli), as ``torchrun ... -m fastscore`` starts it."""

import sys

from fastscore.cli import main

if __name__ == "__main__":
    sys.exit(main())
