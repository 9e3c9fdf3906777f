"""Click glue shared by face-index, face-search and face-train.

``ErrorHandlingGroup`` turns every :class:`FaceSearchError` raised by any
command into one line on stderr and exit code 1 (click keeps exit code 2 for
usage errors), so no command needs its own ``except`` tuple. When a command
ends, it stops the helper processes multiprocessing started (the resource
tracker), so that none outlives the command.
"""

from __future__ import annotations

from typing import Any, Callable

import click

from facesearch.errors import FaceSearchError
from facesearch.logs import setup_logging
from facesearch.processes import stop_helper_processes


class ErrorHandlingGroup(click.Group):
    """A click group whose commands report domain errors as ``Error: <message>``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FaceSearchError as err:
            raise click.ClickException(str(err)) from err
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; rerun the same command to resume") from None
        finally:
            stop_helper_processes()  # no process of the command outlives it


def tool_group(*process_setup: Callable[[], None]) -> Callable[[Callable[[], None]], click.Group]:
    """The top-level group of a facesearch command-line tool: -v/-q logging, -h, clean
    domain errors, and ``process_setup`` (process-wide switches) run once at start.
    The decorated function supplies the name and the help text (with its Example:)."""

    def decorate(f: Callable[[], None]) -> click.Group:
        def main(verbose: int, quiet: bool) -> None:
            setup_logging(verbose, quiet)
            for setup in process_setup:
                setup()

        main.__doc__ = f.__doc__
        main = click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")(main)
        main = click.option("-v", "--verbose", count=True, help="More log output.")(main)
        return click.group(cls=ErrorHandlingGroup, name=f.__name__,
                           context_settings={"help_option_names": ["-h", "--help"]})(main)

    return decorate
