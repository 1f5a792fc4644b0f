"""``python -m blocksieve`` = the ``blocksieve`` console script."""

import sys

from blocksieve.cli import main

sys.exit(main())
