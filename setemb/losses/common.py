"""The loss registry and the numeric helpers every loss shares (float32 widening, distances, a safe sqrt)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from setemb.registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")

_SQRT_EPS = 1e-12


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half / bfloat16 (losses are computed in float32 or wider)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``[n, m]`` between rows of ``a [n, D]`` and ``b [m, D]``, clamped at 0."""
    d2 = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2.0 * a @ b.T  # [n, m]
    return d2.clamp_min(0.0)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with value 0 and a zero (finite) gradient at ``x <= 1e-12``.

    ``d sqrt(x)/dx = 1/(2 sqrt(x))`` is infinite at 0, which turns ``0 * inf`` into NaN for identical points.
    """
    positive = x > _SQRT_EPS
    return torch.where(positive, x.clamp_min(_SQRT_EPS).sqrt(), torch.zeros_like(x))


def _check_sets(name: str, x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} expects elements [B, K, D], got shape {tuple(x.shape)}")


def list_losses() -> list[str]:
    """Registered loss names."""
    return LOSSES.list()


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered as ``name`` (``triplet``, ``pcme``, ``pcmepp``) with ``kwargs``."""
    return LOSSES.create(name, **kwargs)
