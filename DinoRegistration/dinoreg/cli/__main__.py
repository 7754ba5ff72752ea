"""``python -m dinoreg.cli ...``: the ``dinoreg`` command."""

import sys

from dinoreg.cli.main import main

sys.exit(main())
