"""`python -m edpo_export`: the exporter's command line (see edpo_export.cli)."""

import sys

from .cli import main

sys.exit(main(prog="python -m edpo_export"))
