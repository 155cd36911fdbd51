"""``python -m glue``: the same as the ``glue`` command."""

from __future__ import annotations

import sys

from glue.cli import main

sys.exit(main())
