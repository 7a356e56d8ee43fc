"""`python -m jacobprop ...` runs the `jacobprop` command."""

import sys

from .cli import main

sys.exit(main())
