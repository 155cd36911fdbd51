"""List the glue endpoints on the network described by the GLUE_* variables.

python cmd/peers.py            # the same as `glue peers`
python cmd/peers.py --watch    # follow them as they come and go
"""

from __future__ import annotations

import sys

from glue.cli import main

if __name__ == "__main__":
    sys.exit(main(["peers", *sys.argv[1:]]))
