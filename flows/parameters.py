"""Flow parameters rendered from the run knobs (``core.config.RUN_KNOBS``), so they are declared once.

A flow written as ``def flow(*, overrides=None, **knobs)`` gets a real signature with one keyword parameter
per knob: its type and default from ``NestcastConfig`` and its help in the docstring's ``Args:``, which
Prefect turns into the deployment's parameter form (types, defaults, enum choices, descriptions). The
parameters stay flat, so ``prefect deployment run 'sales-forecast/manual' -p epochs=3`` works as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from core.config import RUN_KNOBS, NestcastConfig, knob_default, knob_field

F = TypeVar("F", bound=Callable[..., Any])


def _flow_type(annotation: Any) -> Any:
    """Paths travel as strings (JSON parameters); everything else keeps the config's type."""
    if annotation is Path:
        return str
    if get_origin(annotation) in (Union, type(Path | None)) and Path in get_args(annotation):
        return str | None if type(None) in get_args(annotation) else str  # a folder or a store's URL
    return annotation


def knob_annotation(name: str) -> Any:
    """The knob's flow type carrying the config field's bounds (``Annotated[int, Ge(1)]`` for ``epochs``): the
    deployment's parameter schema (the custom-run form) then has the same ``minimum``/``maximum`` as the config and
    the CLI, and a run with ``epochs=0`` fails the flow's parameter validation before it starts."""
    field = knob_field(name)
    flow_type = _flow_type(field.annotation)
    return Annotated[flow_type, *field.metadata] if field.metadata else flow_type


def knob_parameters(knobs: Iterable[str], defaults: NestcastConfig) -> list[inspect.Parameter]:
    """One keyword-only parameter per knob, typed, bounded and defaulted as in ``defaults``."""
    parameters = []
    for name in knobs:
        default = knob_default(name, defaults)
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=str(default) if isinstance(default, Path) else default,
                annotation=knob_annotation(name),
            )
        )
    return parameters


def with_knobs(knobs: Sequence[str], *, defaults: NestcastConfig, extra: Sequence[inspect.Parameter] = (),
               extra_help: dict[str, str] | None = None) -> Callable[[F], F]:
    """Give ``fn(**knobs)`` the signature ``fn(*, <knobs>, <extra>)`` and document every parameter."""

    def decorate(fn: F) -> F:
        parameters = [*knob_parameters(knobs, defaults), *extra]
        fn.__signature__ = inspect.Signature(parameters, return_annotation=dict[str, Any])  # type: ignore[attr-defined]
        fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": dict[str, Any]}
        helps = {name: RUN_KNOBS[name] for name in knobs} | dict(extra_help or {})
        args = "\n".join(f"    {name}: {helps[name]}" for name in (p.name for p in parameters) if name in helps)
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + args + "\n"
        return fn

    return decorate


OVERRIDES = inspect.Parameter(
    "overrides", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=dict[str, Any] | None
)
OVERRIDES_HELP = {"overrides": "Any other config field by its flat name, e.g. {\"sample_budget\": 4000}."}
