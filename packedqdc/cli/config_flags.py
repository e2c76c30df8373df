"""Typer flags generated from a configuration dataclass, so every option is declared once.

Each field of the dataclass (``TrainConfig``) carries its help text, ``--help`` panel and CLI hints in
``dataclasses.field(metadata=...)`` (see ``packedqdc.train.config.option``). ``config_parameters``
turns the fields into ``inspect.Parameter`` objects whose defaults are ``typer.Option``s, and
``with_parameters`` gives a command function that signature, so Typer builds the flags from it.

Every flag is spelled ``--a-b`` and, as in the seed, ``--a_b``; booleans are ``--a-b/--no-a-b``.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Optional, TypeVar

import typer
from rich.markup import escape

F = TypeVar("F", bound=Callable[..., Any])


def flag_names(name: str) -> list[str]:
    """``["--a-b", "--a_b"]`` for the field or parameter ``a_b`` (one name when it has no ``_``)."""
    dashed = name.replace("_", "-")
    return [f"--{dashed}"] + ([f"--{name}"] if "_" in name else [])


def _cli_type(field: dataclasses.Field, hint: Any) -> tuple[Any, bool]:
    """(the type Typer parses the flag as, whether the field may be None) for a field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if field.metadata.get("cli") == "path":
        base = Path
    elif field.metadata.get("choices"):
        base = Literal[tuple(field.metadata["choices"])]  # type: ignore[misc]
    return base, optional


def config_parameters(cls: type, *, none_default: frozenset[str] = frozenset(),
                      panels: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One keyword parameter per field of the dataclass ``cls``: by panel in the order of ``panels``
    (``--help`` shows the panels in the order they first appear), then in field order.

    A field in ``none_default`` gets the CLI default None (so a caller can tell "not given"), and
    its real default is written into the help text instead.
    """
    hints = typing.get_type_hints(cls)
    params = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} has no help text for its flag")
        base, optional = _cli_type(field, hints[field.name])
        default = field.default
        help_text = meta["help"]
        if field.name in none_default:
            if default is not None:
                help_text += f" [default: {default}]"
            default, optional = None, True
        if isinstance(default, str) and base is Path:
            default = Path(default)
        if base is bool:
            decls = [f"--{field.name.replace('_', '-')}/--no-{field.name.replace('_', '-')}"]
            if "_" in field.name:
                decls.append(f"--{field.name}/--no_{field.name}")
        else:
            decls = flag_names(field.name)
        info = typer.Option(default, *decls, help=escape(help_text), rich_help_panel=meta.get("panel"),
                            show_default=default is not None)
        annotation = Optional[base] if optional else base
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                        annotation=annotation))
    rank = {panel: i for i, panel in enumerate(panels)}
    order = {p.name: rank.get(p.default.rich_help_panel, len(rank)) for p in params}
    return sorted(params, key=lambda p: order[p.name])


def option_parameter(name: str, annotation: Any, default: Any, help: str, panel: str | None = None,
                     decls: list[str] | None = None) -> inspect.Parameter:
    """A keyword parameter for a flag that is not a config field (``--resume``, ``--devices``, ...)."""
    info = typer.Option(default, *(decls or flag_names(name)), help=escape(help), rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)


def with_parameters(params: list[inspect.Parameter]) -> Callable[[F], F]:
    """Give a ``def command(ctx, **options)`` function the signature ``(ctx, *, <params>)``.

    Typer reads the signature (and the annotations) to build the command's flags and calls the
    function with one keyword argument per parameter.
    """

    def decorate(func: F) -> F:
        ctx = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
        names = [p.name for p in params]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TypeError(f"duplicate flag parameter(s): {', '.join(duplicates)}")
        func.__signature__ = inspect.Signature([ctx, *params], return_annotation=None)  # type: ignore[attr-defined]
        func.__annotations__ = {"ctx": typer.Context, **{p.name: p.annotation for p in params}, "return": None}
        return func

    return decorate
