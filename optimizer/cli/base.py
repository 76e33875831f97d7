"""The ``evomerge`` command group: the typer app, the one-line failure convention and helpers the commands share."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from optimizer.errors import EvomergeError


def fail(message: str) -> typer.Exit:
    """The exit of a command refusing bad input: ``error: MESSAGE`` on one line of stderr, exit code 2 (``raise fail(...)``)."""
    typer.secho(f"error: {' '.join(str(message).split())}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system failure: ``PATH: reason`` (read-only folder, full disk, ...)."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


class GuardedGroup(TyperGroup):
    """The command group that turns every expected failure into one line and exit code 2.

    Caught: :class:`~optimizer.errors.EvomergeError` (bad input, a broken set-up) and ``OSError``
    (a read-only folder, a full disk, a file that vanished); Ctrl-C stops with one line and exit
    code 130. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except EvomergeError as exc:
            raise fail(str(exc)) from None
        except BrokenPipeError:  # `evomerge inspect x | head`: the reader left; stop quietly, as cat does
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(code=141) from None
        except OSError as exc:
            raise fail(os_error_line(exc)) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=130) from None


app = typer.Typer(
    name="evomerge",
    help="Evolutionary per-block merge-ratio optimizer for Stable Diffusion checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=GuardedGroup,
)




THREADS_HELP = ("CPU threads torch may use in this process (default: torch's choice, about one per core). "
                "Several processes on one machine: give each cores / processes, or they slow each other down.")


def _study_errors():
    from optimizer.architectures.layout import LayoutError
    from optimizer.checkpoint.types import CheckpointError
    from optimizer.merge.errors import MergeError
    from optimizer.render.prompts import PromptSetError
    from optimizer.study.config import StudyConfigError
    from optimizer.study.export import ExportError
    from optimizer.study.pipeline import BindingError
    from optimizer.study.loop import StudyFailed

    return (StudyConfigError, PromptSetError, CheckpointError, LayoutError, MergeError, ExportError, BindingError, StudyFailed, FileNotFoundError)


