"""The Typer application object, the shared console, and the error boundary of every command."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import signal
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
import typer.rich_utils
from rich.console import Console
from rich.markup import escape

from ..errors import ConfigError, PackedQDCError

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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and ``kill`` send), raised where Ctrl-C would be.

    A subclass of KeyboardInterrupt so that every ``except KeyboardInterrupt`` cleanup (training's
    checkpoint on interrupt, the writer's removal of its temporary directory) runs for both.
    """


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


class GracefulStop:
    """Turns the first Ctrl-C or SIGTERM into a request that the running job polls (``reason()``),
    so that it stops at a clean point; a second signal interrupts at once, as usual.

    Use as a context manager around a long job (training); outside it, the handlers of
    ``handles_errors`` apply again.
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._previous: dict[int, Any] = {}

    def reason(self) -> str | None:
        """None until a signal came; then "interrupted" (SIGINT) or "terminated" (SIGTERM)."""
        return self._reason

    def _handle(self, signum: int, frame: Any) -> None:
        if self._reason is not None:  # the second signal: stop now
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self._reason = "terminated" if signum == signal.SIGTERM else "interrupted"
        err_console.print(f"[bold yellow]{'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}:[/] stopping "
                          "after this step with a checkpoint (signal again to stop at once)")

    def __enter__(self) -> GracefulStop:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


#: exit codes of a job stopped by a signal (128 + signal number, as shells report them)
SIGNAL_EXIT = {"interrupted": 130, "terminated": 143}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names, then what went wrong."""
    reason = exc.strerror or (str(exc.args[0]) if exc.args else type(exc).__name__)
    if exc.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    elif exc.errno == errno.EROFS:
        reason += " (read-only file system)"
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[bold red]Error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handles_errors(func: F) -> F:
    """The CLI's one error boundary: every failure becomes ``Error: <one line>`` and an exit code.

    Library errors keep their exit code; OSError (missing, unreadable, read-only, full) names the
    path; a damaged zip container is an unreadable input (2); SIGTERM is handled like Ctrl-C (130
    for Ctrl-C, 143 for SIGTERM, after the command's own cleanup ran). Anything else is a bug,
    reported as one line too, with ``--debug`` showing the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _raise_terminated)
        except ValueError:  # not the main thread (e.g. the CLI driven from a test thread)
            previous = None
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            if _state["debug"]:
                raise
            raise _fail(*_describe(exc)) from None
        except KeyboardInterrupt as exc:
            if _state["debug"]:
                raise
            terminated = isinstance(exc, Terminated)
            err_console.print(f"[bold red]{'Terminated' if terminated else 'Interrupted'}.[/]")
            raise typer.Exit(143 if terminated else 130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def _describe(exc: Exception) -> tuple[str, int]:
    """(one-line message, exit code) of an exception that reached the CLI boundary."""
    if isinstance(exc, PackedQDCError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        return os_error_message(exc), 1
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a readable zip/NPZ container ({exc})", 2
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --chunk-size or --batch-size)", 1
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"unexpected {type(exc).__name__}{': ' + first if first else ''} "
            "(a bug in packedqdc: rerun with --debug for the traceback and report it)"), 1


def check_output_file(file: Path, option: str) -> None:
    """Fail before any work when ``file`` (an output named by ``option``) cannot be written there."""
    if file.is_dir():
        raise ConfigError(f"{file}: {option} names a directory; give a file name")
    if not file.parent.is_dir():
        raise ConfigError(f"{file.parent}: directory of {option} does not exist")
    if not os.access(file.parent, os.W_OK):
        raise ConfigError(f"{file.parent}: directory of {option} is not writable")


def json_text(data: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259) of ``data``: NaN and infinities, which JSON cannot hold, become null."""
    return json.dumps(_finite_or_none(data), indent=indent, allow_nan=False)


def _finite_or_none(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_none(value) for value in data]
    return data
