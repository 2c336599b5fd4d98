"""Seeded set databases and queries shared by the SetIndex tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

K, D = 4, 16


def sets(n: int, k: int = K, d: int = D, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, k, d, generator=g), dim=-1)  # [n, k, d]


def clustered(n: int, q: int, seed: int = 0, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Items take K of 8 concepts of one topic (n/20 topics); queries redraw the noise of random items' concepts."""
    g = torch.Generator().manual_seed(seed)
    topics = max(1, n // 20)
    concepts = F.normalize(
        torch.randn(topics, 1, d, generator=g) + 0.7 * torch.randn(topics, 8, d, generator=g), dim=-1
    )
    topic = torch.randint(0, topics, (n,), generator=g)
    choice = torch.rand(n, 8, generator=g).argsort(1)[:, :K]  # [n, K]
    centres = concepts[topic[:, None], choice]  # [n, K, d]
    db = F.normalize(centres + 0.5 * torch.randn(n, K, d, generator=g) / d**0.5, dim=-1)
    src = torch.randint(0, n, (q,), generator=g)
    queries = F.normalize(centres[src] + 0.5 * torch.randn(q, K, d, generator=g) / d**0.5, dim=-1)
    return db, queries


def recall_at_10(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True)])) / 10
