"""``python -m dinoreg ...`` (and ``PythonSlicer -m dinoreg ...``): the ``dinoreg`` command."""

import sys

from dinoreg.cli.main import main

sys.exit(main())
