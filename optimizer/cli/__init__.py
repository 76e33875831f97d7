"""The ``evomerge`` command line (typer). Each command is a thin shell over a library function; the
commands live in one module per group and register themselves on :data:`app`."""

# isort: off
# the command modules register their commands on `app` when imported, in this (help) order
from optimizer.cli import checkpoints, scoring, studies, candidates, zoo  # noqa: F401
# isort: on
from optimizer.cli.base import app, os_error_line
from optimizer.cli.studies import export_hint

__all__ = ["app", "export_hint", "os_error_line"]
