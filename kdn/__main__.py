import sys

from kdn.cli import main

sys.exit(main())
