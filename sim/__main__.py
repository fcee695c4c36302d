"""python -m pacsnode.sim: see sim/cli.py."""

import sys

from pacsnode.sim.cli import entry

sys.exit(entry())
