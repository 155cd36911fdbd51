"""A rendezvous and several endpoints discovering each other on 127.0.0.1 (`glue demo`)."""

from __future__ import annotations

import sys

from glue.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
