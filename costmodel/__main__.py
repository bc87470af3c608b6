"""``python -m costmodel``: the cost calculator."""

import sys

from costmodel.cli import main

sys.exit(main())
