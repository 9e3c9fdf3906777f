"""Backends by name, one registry per stage (detector, landmarks, embedder).

This module depends on nothing else in ``embedder``: backend modules import it
to register themselves with :func:`register`. The built-in backends register
when ``embedder.backends`` is imported, which ``embedder.pipeline`` (and so the
``embedder`` package itself) does; a plug-in backend registers when its module
is imported. Factories are cheap: a backend loads its model on first use,
never at import.
"""

from __future__ import annotations

from typing import Any, Callable

from facesearch.errors import BackendError

STAGES = ("detector", "landmarks", "embedder")
_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {stage: {} for stage in STAGES}


class UnknownBackendError(BackendError, ValueError):
    """A backend name (or stage) that no registry knows; the message lists the known ones."""


def register(stage: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: ``@register("embedder", "my-name")`` makes the class buildable by that name."""
    if stage not in _REGISTRY:
        raise ValueError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[stage][name] = factory
        return factory

    return decorator


def available(stage: str) -> list[str]:
    """Names registered for ``stage``, sorted."""
    return sorted(_REGISTRY[stage])


def create(stage: str, name: str, **options: Any) -> Any:
    """Build the ``stage`` backend called ``name`` with ``options``."""
    if stage not in _REGISTRY:
        raise UnknownBackendError(f"unknown stage {stage!r}: one of {', '.join(STAGES)}")
    try:
        factory = _REGISTRY[stage][name]
    except KeyError:
        raise UnknownBackendError(
            f"unknown {stage} backend {name!r}; available: {', '.join(sorted(_REGISTRY[stage]))}"
        ) from None
    return factory(**options)
