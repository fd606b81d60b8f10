"""``python -m attnpatch`` (and ``torchrun --nproc-per-node N -m attnpatch ...``): the attnpatch command."""

import sys

from .cli import main

sys.exit(main())
