"""`python -m zimage`: the same as the `zimage` command."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the command line itself: one line, as later
    sys.stderr.write("interrupted\n")
    sys.exit(130)

main()
