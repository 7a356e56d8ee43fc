"""`python -m jacobprop.cli ...` runs the `jacobprop` command (as `python -m jacobprop`)."""

import sys

from . import main

sys.exit(main())
