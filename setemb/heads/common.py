"""What every head returns (``SetOutput``), the ``HEADS`` registry and the input checks every head shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from setemb.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


@dataclass
class SetOutput:
    """What every head returns (docs/DESIGN.md)."""

    embeddings: Tensor  # [B, K, D] rows L2-normalised (PCME: J samples, not re-normalised)
    attention: Tensor | None = None  # [B, K, N] weights of each element over the inputs
    elements: Tensor | None = None  # [B, K, D] row-normalised elements before adding the global feature
    global_embedding: Tensor | None = None  # [B, D] L2-normalised global branch
    mean: Tensor | None = None  # [B, D] PCME mu
    logsigma: Tensor | None = None  # [B, D] PCME log std


def list_heads() -> list[str]:
    """Registered head names, sorted."""
    return HEADS.list()


def create_head(name: str, **kwargs: Any) -> nn.Module:
    """Build the head registered as ``name``; ``None`` kwargs fall back to the constructor defaults."""
    return HEADS.create(name, **kwargs)


def _check_inputs(local: Tensor, global_: Tensor, mask: Tensor | None, input_dim: int, embed_dim: int) -> None:
    """ValueError with expected and actual shapes unless local [B, N, D_in], global_ [B, D], mask [B, N] bool."""
    if local.ndim != 3 or local.shape[-1] != input_dim:
        raise ValueError(f"local must be [B, N, {input_dim}], got {tuple(local.shape)}")
    B, N, _ = local.shape
    if global_ is None or tuple(global_.shape) != (B, embed_dim):
        got = None if global_ is None else tuple(global_.shape)
        raise ValueError(f"global_ must be [{B}, {embed_dim}], got {got}")
    if mask is not None and (tuple(mask.shape) != (B, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{B}, {N}], got {mask.dtype} {tuple(mask.shape)}")
