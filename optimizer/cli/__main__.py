"""``python -m optimizer.cli``: the ``evomerge`` command."""

from optimizer.cli import app

app()
