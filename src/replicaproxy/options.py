"""Click option classes shared by ``replicaproxy run`` and ``replicaproxy ctl``."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["Once"]


class Once(click.Option):
    """An option that takes one value: given twice, it is an error, not a silent override.

    (click keeps the last of repeated values, so ``--mode 0 --mode sync`` would run
    in sync mode without a word about the bad ``0``.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "default" in kwargs:
            kwargs["default"] = (kwargs["default"],)
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def value_from_envvar(self, ctx: click.Context) -> Any:
        # One value, as typed: not split on whitespace as a repeatable option's would be.
        value = self.resolve_envvar_value(ctx)
        return (value,) if value else None

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        values = super().process_value(ctx, value)
        if len(values) > 1:
            given = ", ".join(repr(v) for v in values)
            raise click.BadParameter(
                f"given {len(values)} times ({given}); it takes one value", ctx=ctx, param=self
            )
        return values[0] if values else None
