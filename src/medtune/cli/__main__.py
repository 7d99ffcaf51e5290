"""`python -m medtune.cli ...`: the command line run as a module (how tests and the launcher start it)."""

import sys

from medtune.cli import app

sys.exit(app())
