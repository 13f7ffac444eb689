"""`python -m mondrian.cli ...` runs the command line."""

import sys

from mondrian.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
