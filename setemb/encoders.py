"""Trainable projections above frozen backbones (M§2): local [B, N, D_in] (or token ids) -> (local, global).

Every encoder has ``forward(local, global_, mask) -> (local [B, N, D_l], global_ [B, D])`` and exposes
``local_dim`` (D_l, what the head must take as ``input_dim``) and ``embed_dim`` (D). Registered (`list_encoders()`):

- ``grid``: `GridProjection`, per-cell Linear (= 1x1 conv); global = projected average of the cells.
- ``region``: `RegionEncoder`, BUTD regions, f(x) = Drop(L(x) + MLP(L(x))); global = masked max pool.
- ``token``: `TokenProjection`, Linear on token states (BERT / MiniLM); global = masked max pool.
- ``bigru``: `BiGRUEncoder`, word embeddings as local (D_l = word_dim), mean of final fwd/bwd GRU states as global.

`drop_tokens` is the "size augmentation" of M§5 (drop 20 % of regions / words in training), applied by `Tower`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from setemb.registry import Registry

logger = logging.getLogger(__name__)

ENCODERS: Registry[nn.Module] = Registry("encoder")


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return ENCODERS.list()


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name``; ``None`` kwargs fall back to the constructor defaults."""
    return ENCODERS.create(name, **kwargs)


def drop_tokens(mask: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Size augmentation (M§5): drop each valid token with probability ``p``, keeping at least one per sample.

    A sample whose valid tokens would all be dropped keeps one of them, chosen at random. Samples with no valid
    token stay empty.

    Args:
        mask: [B, N] bool, True = valid.
        p: drop probability in [0, 1).
        generator: seeds the draw (must live on ``mask.device``).

    Returns:
        [B, N] bool, a subset of ``mask``.
    """
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, N], got {mask.dtype} {tuple(mask.shape)}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1), got {p}")
    scores = torch.rand(mask.shape, generator=generator, device=mask.device)  # [B, N]
    keep = mask & (scores >= p)  # [B, N]
    fallback = scores.masked_fill(~mask, -1.0).argmax(dim=1, keepdim=True)  # [B, 1] a random valid token
    rescue = torch.zeros_like(mask).scatter_(1, fallback, True) & mask & ~keep.any(dim=1, keepdim=True)
    return keep | rescue


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over valid tokens: x [B, N, D], mask [B, N] bool or None -> [B, D] (0 for a sample with none)."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype)[..., None]  # [B, N, 1]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def masked_max(x: Tensor, mask: Tensor | None) -> Tensor:
    """Max over valid tokens: x [B, N, D], mask [B, N] bool or None -> [B, D] (0 for a sample with none)."""
    if mask is None:
        return x.amax(dim=1)
    pooled = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).amax(dim=1)  # [B, D]
    return torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


def _check_local(local: Tensor, mask: Tensor | None, input_dim: int | None) -> None:
    """ValueError unless local is [B, N, input_dim] (or [B, N] ids when input_dim is None) and mask [B, N] bool."""
    if input_dim is None:
        if local.ndim != 2 or local.is_floating_point():
            raise ValueError(f"token ids must be integer [B, N], got {local.dtype} {tuple(local.shape)}")
    elif local.ndim != 3 or local.shape[-1] != input_dim:
        raise ValueError(f"local must be [B, N, {input_dim}], got {tuple(local.shape)}")
    if mask is not None and (tuple(mask.shape) != tuple(local.shape[:2]) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool {list(local.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")


@ENCODERS.register("grid")
class GridProjection(nn.Module):
    """Conv grid (M§2, ResNet-152 / ResNeXt-101): per-cell Linear D_in -> D ("1x1 conv"); global = projected average.

    Args:
        input_dim: D_in channels of the grid (2048).
        embed_dim: D.
        global_dim: width of a separate global feature (avg-pooled backbone output); None derives the global from
            the masked mean of the cells (avgpool∘linear = linear∘avgpool), ignoring ``global_``.
        project_local: False passes the raw cells through as local (PVSE's PIE-Net reads raw 2048-d cells);
            the head's ``input_dim`` is then D_in.
    """

    def __init__(
        self,
        input_dim: int,
        embed_dim: int = 1024,
        global_dim: int | None = None,
        project_local: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.input_dim, self.embed_dim, self.global_dim = input_dim, embed_dim, global_dim
        self.local_dim = embed_dim if project_local else input_dim
        self.proj = nn.Linear(input_dim, embed_dim, **dd) if project_local else None
        if global_dim is not None:
            self.global_proj = nn.Linear(global_dim, embed_dim, **dd)
        else:
            self.global_proj = None if project_local else nn.Linear(input_dim, embed_dim, **dd)

    def forward(self, local: Tensor, global_: Tensor | None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Args: local [B, N, D_in]; global_ [B, global_dim] (needed iff global_dim is set); mask [B, N] bool.

        Returns:
            local [B, N, D_l], global_ [B, D].
        """
        _check_local(local, mask, self.input_dim)
        B = local.shape[0]
        projected = local if self.proj is None else self.proj(local)  # [B, N, D_l]
        if self.global_dim is not None:
            if global_ is None or tuple(global_.shape) != (B, self.global_dim):
                got = None if global_ is None else tuple(global_.shape)
                raise ValueError(f"global_ must be [{B}, {self.global_dim}], got {got}")
            return projected, self.global_proj(global_)
        if self.global_proj is None:
            return projected, masked_mean(projected, mask)  # [B, D]
        return projected, self.global_proj(masked_mean(local, mask))


@ENCODERS.register("region")
class RegionEncoder(nn.Module):
    """BUTD regions (M§2): f(x) = Drop(L(x) + MLP(L(x))), global = masked max pool of f over valid regions.

    L: Linear D_in -> D; MLP: Linear D -> D/2 -> BatchNorm1d (statistics over valid regions only) -> ReLU ->
    Linear D/2 -> D. In training, the valid regions are gathered with a boolean index (one host sync per call).

    Args:
        input_dim: D_in (2048). embed_dim: D. dropout: 0.1.
    """

    def __init__(
        self,
        input_dim: int,
        embed_dim: int = 1024,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.input_dim, self.embed_dim, self.local_dim = input_dim, embed_dim, embed_dim
        self.linear = nn.Linear(input_dim, embed_dim, **dd)
        self.fc1 = nn.Linear(embed_dim, embed_dim // 2, **dd)
        self.bn = nn.BatchNorm1d(embed_dim // 2, **dd)
        self.fc2 = nn.Linear(embed_dim // 2, embed_dim, **dd)
        self.dropout = nn.Dropout(dropout)

    def _batch_norm(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        """BatchNorm1d over the valid tokens of hidden [B, N, D/2]; padded positions pass through unnormalised."""
        B, N, C = hidden.shape
        if mask is None or not self.training:  # eval: per-token running statistics, padding is irrelevant
            return self.bn(hidden.reshape(B * N, C)).reshape(B, N, C)
        return hidden.masked_scatter(mask[..., None], self.bn(hidden[mask]))  # [B, N, C]

    def forward(
        self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Args: local [B, N, D_in]; global_ ignored; mask [B, N] bool or None.

        Returns:
            local [B, N, D], global_ [B, D] (masked max pool).
        """
        _check_local(local, mask, self.input_dim)
        base = self.linear(local)  # [B, N, D]
        hidden = torch.relu(self._batch_norm(self.fc1(base), mask))  # [B, N, D/2]
        features = self.dropout(base + self.fc2(hidden))  # [B, N, D]
        return features, masked_max(features, mask)


@ENCODERS.register("token")
class TokenProjection(nn.Module):
    """Token states of a frozen language model (M§2, BERT): Linear D_in -> D; global = masked max pool.

    Args:
        input_dim: D_in (768 BERT, 384 MiniLM). embed_dim: D.
    """

    def __init__(
        self,
        input_dim: int,
        embed_dim: int = 1024,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_dim, self.embed_dim, self.local_dim = input_dim, embed_dim, embed_dim
        self.proj = nn.Linear(input_dim, embed_dim, device=device, dtype=dtype)

    def forward(
        self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Args: local [B, N, D_in]; global_ ignored; mask [B, N] bool or None.

        Returns:
            local [B, N, D], global_ [B, D] (masked max pool).
        """
        _check_local(local, mask, self.input_dim)
        projected = self.proj(local)  # [B, N, D]
        return projected, masked_max(projected, mask)


@ENCODERS.register("bigru")
class BiGRUEncoder(nn.Module):
    """Bi-GRU text encoder (M§2, VSE∞ style): local = word embeddings, global = mean of final fwd/bwd states.

    Valid tokens need not be contiguous (e.g. after `drop_tokens`): they are packed to the front, in order, before
    the GRU, while ``local`` keeps the original positions (the mask still applies to it).

    Args:
        vocab_size: V. word_dim: 300 (GloVe). hidden_dim: per direction (1024).
        embed_dim: D; a Linear maps the hidden_dim global to D when they differ.
        pretrained_vectors: [V, word_dim] initial word vectors (init only: leave it out of saved configs, the
            checkpoint's state dict carries the fine-tuned table). Default init N(0, 1).
        dropout: on the word embeddings (0.1).
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int = 300,
        hidden_dim: int = 1024,
        embed_dim: int = 1024,
        pretrained_vectors: Tensor | np.ndarray | None = None,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.vocab_size, self.embed_dim, self.local_dim = vocab_size, embed_dim, word_dim
        self.embedding = nn.Embedding(vocab_size, word_dim, **dd)
        if pretrained_vectors is not None:
            vectors = torch.as_tensor(pretrained_vectors)
            if tuple(vectors.shape) != (vocab_size, word_dim):
                raise ValueError(f"pretrained_vectors must be [{vocab_size}, {word_dim}], got {tuple(vectors.shape)}")
            with torch.no_grad():
                self.embedding.weight.copy_(vectors)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True, bidirectional=True, **dd)
        self.proj = nn.Linear(hidden_dim, embed_dim, **dd) if hidden_dim != embed_dim else nn.Identity()

    def forward(
        self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Args: local [B, N] integer token ids; global_ ignored; mask [B, N] bool or None.

        Returns:
            local [B, N, word_dim] (dropped-out word embeddings), global_ [B, D].
        """
        _check_local(local, mask, None)
        B, N = local.shape
        words = self.dropout(self.embedding(local))  # [B, N, W]
        if mask is None:
            mask = torch.ones(B, N, dtype=torch.bool, device=local.device)
        order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # [B, N] valid tokens first, in order
        packed_words = words.gather(1, order[..., None].expand_as(words))  # [B, N, W]
        lengths = mask.sum(dim=1).clamp(min=1).cpu()  # pack_padded_sequence wants CPU lengths (one sync per call)
        packed = pack_padded_sequence(packed_words, lengths, batch_first=True, enforce_sorted=False)
        _, final = self.gru(packed)  # [2, B, hidden]
        return words, self.proj(final.mean(dim=0))  # [B, N, W], [B, D]
