"""Reading a hospital's node config (``flower-supernode --node-config 'key=value ...'``): one parser per kind of
value, each naming the key in its error. The node config is the hospital's own and its security boundary: every
path, the backbone and the privacy floor (:mod:`client.floor`) come from it, never from the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.config import split_names
from shared.errors import RetuneError

NodeConfig = Mapping[str, Any]


def flag(values: NodeConfig, key: str, default: bool = False) -> bool:
    """``true`` or ``false`` (Flower passes booleans or their text)."""
    value = values.get(key, default)
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise RetuneError(f"node config {key}={value!r}: use true or false")
    return text == "true"


def whole(values: NodeConfig, key: str, default: int, minimum: int = 1) -> int:
    """A whole number of at least ``minimum``."""
    value = values.get(key, default)
    try:
        number = int(value)
        if isinstance(value, bool) or number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum:
        raise RetuneError(f"node config {key}={value!r}: use a whole number of at least {minimum}")
    return number


def number(values: NodeConfig, key: str, default: float) -> float:
    """A finite number."""
    value = values.get(key, default)
    try:
        result = float(value)
        if isinstance(value, bool) or result != result or result in (float("inf"), float("-inf")):
            raise ValueError
    except (TypeError, ValueError):
        raise RetuneError(f"node config {key}={value!r}: use a number") from None
    return result


def names(values: NodeConfig, key: str, default: tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated, non-empty list drawn from ``allowed``."""
    found = split_names(str(values.get(key, ",".join(default))))
    if not found or any(n not in allowed for n in found):
        raise RetuneError(f"node config {key}={values.get(key)!r}: use one or more of {', '.join(allowed)}, "
                          "comma-separated")
    return found
