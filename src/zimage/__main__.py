"""`python -m zimage`: the same command as `zimage` (torchrun starts processes this way)."""

from .cli import app

app(prog_name="zimage")
