"""Settings read from JSON (a model's ``config.json``: monitoring, quality) checked before use,
one reader per kind of value, shared by every setting of that kind.

Python's conversions are too lenient for settings: ``bool("false")`` is true, ``int(2.7)`` is
2, ``tuple("color")`` is five one-letter names and ``dict([["a", 1]])`` an object. These readers
take JSON's own types only (a boolean is ``true``/``false``, a count a whole number, a list of
names a list of strings) and raise :class:`~edgewise.runtime.errors.InvalidInput` naming the
setting (``where``) and the value otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgewise.runtime.errors import InvalidInput

__all__ = ["count", "flag", "known_keys", "names", "number", "numbers"]


def known_keys(where: str, table: Mapping[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Refuse a table with a key outside ``allowed``, naming the unknown keys and the known."""
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise InvalidInput(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(allowed))})"
        )


def flag(where: str, value: Any) -> bool:
    """A JSON boolean."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false, not {value!r}")
    return value


def count(where: str, value: Any, minimum: int = 0) -> int:
    """A whole JSON number >= ``minimum`` (not a boolean, not 2.0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInput(f"{where} must be a whole number >= {minimum}, not {value!r}")
    return value


def number(where: str, value: Any) -> float:
    """A finite JSON number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where} must be a number, not {value!r}")
    result = float(value)
    if not math.isfinite(result) or result < 0:
        raise InvalidInput(f"{where} must be a finite number >= 0, not {value!r}")
    return result


def names(where: str, value: Any) -> tuple[str, ...]:
    """A JSON list of non-empty strings (a lone string is not a list of its letters)."""
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InvalidInput(f"{where} must be a list of names (non-empty strings), not {value!r}")
    return tuple(value)


def numbers(where: str, value: Any) -> dict[str, int | float]:
    """A JSON object of finite numbers >= 0, kept as given (whole numbers stay ints): the
    keyword arguments of something that checks its own ranges and names."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{where} must be an object, not {value!r}")
    result: dict[str, int | float] = {}
    for key, item in value.items():
        number(f"{where}.{key}", item)
        result[str(key)] = item
    return result
