"""``python -m wantrain`` (and ``torchrun -m wantrain``): the command line."""

import sys

from .commands.cli import main

sys.exit(main())
