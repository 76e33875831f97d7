"""The ``evomerge`` command line (typer). Each command is a thin shell over a library function; the
commands live in one module per group and register themselves on :data:`app`. Installed plug-ins
add theirs through the entry-point group ``evomerge.commands`` (see :mod:`optimizer.plugins`): the
embedded zoo's ``evomerge zoo ...`` is one, so the runtime never imports the zoo."""

# isort: off
# the command modules register their commands on `app` when imported, in this (help) order
from optimizer.cli import checkpoints, scoring, studies, candidates  # noqa: F401
# isort: on
from optimizer.cli.base import app, os_error_line
from optimizer.cli.studies import export_hint
from optimizer.plugins import COMMANDS_GROUP, group_entry_points

for _point in group_entry_points(COMMANDS_GROUP):
    try:
        _point.load()(app)
    except Exception as _exc:  # noqa: BLE001 - one broken plug-in must not take the whole command line down
        import sys

        print(f"warning: the {COMMANDS_GROUP} plug-in {_point.name} ({_point.value}) is skipped: {_exc}", file=sys.stderr)

__all__ = ["app", "export_hint", "os_error_line"]
