"""`python -m medfm ...` is the same as `medfm ...`."""

import sys

from medfm.cli import main

sys.exit(main())
