"""``python -m losa``: the ``losa`` command line."""

import sys

from losa.cli import main

sys.exit(main())
