"""Aggregation strategies, one module each, and a registry by name.

    >>> import fedlora.strategies as s
    >>> s.names()
    ['fedex_lora', 'fedit', 'ffa_lora', 'flexlora', 'flora', 'hetlora', 'lora_a2', 'zero_pad']
    >>> strategy = s.get("flexlora", split="sqrt")

A new method subclasses `fedlora.Strategy` and registers itself with `@register`.
"""

from __future__ import annotations

from typing import Any

from fedlora.core.contract import FedLoraError, Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make `cls` available as ``get(cls.name)``."""
    if not cls.name:
        raise FedLoraError(f"{cls.__qualname__} has no `name`")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """The registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_class(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise FedLoraError(f"unknown strategy {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str, **options: Any) -> Strategy:
    """Instantiate the strategy registered as `name` with its options."""
    cls = get_class(name)
    try:
        return cls(**options)
    except TypeError as e:  # unknown option: name it instead of a bare TypeError
        raise FedLoraError(f"strategy {name}: {e}") from None


from fedlora.strategies import (  # noqa: E402,F401  (registration side effects)
    fedex_lora,
    fedit,
    ffa_lora,
    flexlora,
    flora,
    hetlora,
    lora_a2,
    zero_pad,
)
