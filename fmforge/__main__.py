"""`python -m fmforge ...` and `torchrun ... -m fmforge ...`: the fmforge command."""

import sys

from .cli import main

sys.exit(main())
