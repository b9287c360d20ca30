"""How the command line presents itself: Typer's rich help, with on/off flags shown as bare flags (Typer labels them
`<bool>`, which makes `--json true` look valid) and arguments in the usage line as `DIR` rather than Typer's
`{dir}`; and Ctrl-C in any command as one line and exit code 130 (Typer exits 130 without a word)."""

from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

EXIT_INTERRUPTED = 130


def bare_flags(params: list) -> list:
    for p in params:
        if getattr(p, "is_flag", False):
            p.metavar = ""  # the type column shows the metavar when one is set
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return bare_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = p.display_name_raw.upper()
                pieces.append(name if p.required else f"[{name}]")
        return pieces


class Group(TyperGroup):
    def get_params(self, ctx):
        return bare_flags(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # commands that say more (generate: what was written) catch it themselves
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
