"""`python -m zimage`: the same as the `zimage` command."""

from .cli import main

main()
