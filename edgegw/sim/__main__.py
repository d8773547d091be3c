"""``python -m edgegw.sim``: the same as the ``edgegw-sim`` command."""

import sys

from edgegw.sim.cli import main

sys.exit(main())
