"""`python -m packed_vit encode ...` / `python -m packed_vit demo`: see packed_vit.cli."""

import sys

from .cli import main

sys.exit(main())
