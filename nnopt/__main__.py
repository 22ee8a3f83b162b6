"""``python -m nnopt``."""

import sys

from nnopt.cli import main

sys.exit(main())
