"""Backends by name, one registry per stage (detector, landmarks, embedder).

Factories are registered at import of ``embedder.backends`` and are cheap:
a backend loads its model on first use, never at import.
"""

from __future__ import annotations

from typing import Any, Callable

STAGES = ("detector", "landmarks", "embedder")
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {stage: {} for stage in STAGES}


class UnknownBackendError(ValueError):
    """A backend name that no registry knows."""


def register(stage: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    if stage not in _REGISTRY:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[stage][name] = factory
        return factory

    return decorator


def available(stage: str) -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY[stage])


def create(stage: str, name: str, **options: Any) -> Any:
    """Build the ``stage`` backend called ``name`` with ``options``."""
    _load_builtin()
    if stage not in _REGISTRY:
        raise UnknownBackendError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    try:
        factory = _REGISTRY[stage][name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown {stage} backend {name!r}; available: {', '.join(sorted(_REGISTRY[stage]))}"
        ) from None
    return factory(**options)


def _load_builtin() -> None:
    import embedder.backends  # noqa: F401  (registers the built-in backends)
