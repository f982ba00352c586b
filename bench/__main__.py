"""``python -m bench ...``: the same as ``epd bench ...`` (see ``bench/cli.py``)."""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
