"""The Typer application object, the shared console, and the error boundary of every command."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape

from ..errors import PackedQDCError

app = typer.Typer(
    name="packedqdc",
    help="Pack molecular datasets into memory-mapped files and train PhysNet potentials on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
pack_app = typer.Typer(
    help="Convert a dataset (NPZ, OpenQDC cache, extended XYZ, SPICE/ANI HDF5) into a packed directory.",
    no_args_is_help=True,
)
app.add_typer(pack_app, name="pack")

console = Console()
err_console = Console(stderr=True)

_state = {"debug": False}


def _one_line_usage_error(exc: Exception) -> None:
    """Print a usage error (unknown flag, bad value) as one line instead of Typer's boxed panel.

    ``exc`` is a click ``ClickException`` (Typer vendors click, so it is not imported here).
    """
    message = exc.format_message()  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    err_console.print(f"[bold red]Error:[/] {escape(message)}{escape(hint)}", highlight=False, soft_wrap=True)


# Typer looks this hook up at call time; replacing it keeps every error of the CLI to one line.
typer.rich_utils.rich_format_error = _one_line_usage_error


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(func: F) -> F:
    """Turn library errors into a one-line ``Error: ...`` message and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PackedQDCError as exc:
            if _state["debug"]:
                raise
            err_console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            err_console.print("[bold red]Interrupted.[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
