"""Click glue shared by face-index, face-search and face-train.

``ErrorHandlingGroup`` turns every :class:`FaceSearchError` raised by any
command into one line on stderr and exit code 1 (click keeps exit code 2 for
usage errors), so no command needs its own ``except`` tuple.
"""

from __future__ import annotations

from typing import Any

import click

from facesearch.errors import FaceSearchError


class ErrorHandlingGroup(click.Group):
    """A click group whose commands report domain errors as ``Error: <message>``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FaceSearchError as err:
            raise click.ClickException(str(err)) from err
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; rerun the same command to resume") from None
