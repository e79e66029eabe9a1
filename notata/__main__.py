"""``python -m notata``: the ``notata`` command."""

import sys

from .cli import main

sys.exit(main())
