"""A small name -> builder registry shared by heads, encoders, similarities and losses ([TIMM] _registry)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lowercase snake_case names to builders.

    Args:
        kind: what is registered ("head", "similarity", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``fn`` under ``name``; re-registering a name warns and overwrites."""

        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                logger.warning("%s %r registered twice; the later one wins", self.kind, name)
            self._builders[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        """The builder registered as ``name``; ``ValueError`` naming the known ones otherwise."""
        try:
            return self._builders[name]
        except KeyError:
            known = ", ".join(sorted(self._builders))
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build ``name`` with ``kwargs``; ``None`` values are dropped so builder defaults apply ([TIMM])."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def list(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
