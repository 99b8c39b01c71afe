"""Range checks for the hyper-parameter dataclasses of ``model/`` (``TrainConfig``,
``LearnPolicy``): one message shape, ``Owner.name must be ..., got value``, raised as
:class:`model.errors.ConfigError`. Booleans are never numbers here (``True`` is not a
learning rate)."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from model.errors import ConfigError


def _fail(owner: str, name: str, rule: str, got: Any) -> ConfigError:
    return ConfigError(f"{owner}.{name} must be {rule}, got {got!r}")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def integer(owner: str, name: str, value: Any, minimum: int) -> None:
    """``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(owner, name, f"an integer >= {minimum}", value)


def finite(owner: str, name: str, value: Any, *, above: float | None = None,
           minimum: float | None = None) -> None:
    """``value`` is a finite number, ``> above`` and/or ``>= minimum``."""
    bound = f" > {above:g}" if above is not None else f" >= {minimum:g}" if minimum is not None \
        else ""
    if (
        not _is_number(value)
        or (above is not None and value <= above)
        or (minimum is not None and value < minimum)
    ):
        raise _fail(owner, name, f"a finite number{bound}", value)


def fraction(owner: str, name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` is a number in (0, 1] (or None when ``optional``)."""
    if optional and value is None:
        return
    if not (_is_number(value) and 0.0 < value <= 1.0):
        rule = "None or a number in (0, 1]" if optional else "a number in (0, 1]"
        raise _fail(owner, name, rule, value)


def choice(owner: str, name: str, value: Any, options: Collection[str]) -> None:
    """``value`` is one of ``options`` (named in the message as 'a', 'b' or 'c')."""
    if value not in options:
        quoted = [repr(o) for o in options]
        rule = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
        raise _fail(owner, name, rule, value)
