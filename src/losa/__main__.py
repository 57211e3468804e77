"""``python -m losa``: the ``losa`` command line."""

import sys

from losa.cli import main

if __name__ == "__main__":
    sys.exit(main())
