"""Tiled scoring of query sets against a gallery (M§6), optionally top-k, never materialising ``B·G·K·L``."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setemb.similarity.functions import _NAME_OF, SIMILARITIES, _apply, _check_sets, _resolve_kwargs
from setemb.similarity.kernels import _KERNELS, _compute_dtype, _Kernel, _needs_grad, _Sets, _Workspace

_TILE_ELEMENTS = 1 << 24  # ~64 MB of float32 per tile in score(): few, large ops (robust on busy CPUs)


def _block_sizes(block_size: int | tuple[int, int] | None, cost: int) -> tuple[int, int]:
    if block_size is None:
        side = max(1, math.isqrt(max(1, _TILE_ELEMENTS // max(1, cost))))
        return side, side
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"block_size must be a positive int or (query, gallery) pair, got {block_size}")
    return int(sizes[0]), int(sizes[1])


def _rows(x: Any, start: int, stop: int, device: torch.device) -> Tensor | None:
    """Rows ``start:stop`` of a tensor or an array-like (numpy, zarr) as a tensor on ``device``."""
    if x is None:
        return None
    block = x[start:stop]
    return (block if isinstance(block, Tensor) else torch.as_tensor(np.asarray(block))).to(device)


def _merge_topk(values: Tensor, indices: Tensor, tile: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k over columns seen so far; ties keep the lower gallery index (stable sort, lower indices first)."""
    Bt, Gt = tile.shape
    new = torch.arange(start, start + Gt, device=tile.device).expand(Bt, Gt)  # [Bt, Gt]
    values, order = torch.sort(torch.cat([values, tile], 1), dim=1, descending=True, stable=True)
    indices = torch.cat([indices, new], 1).gather(1, order[:, :k])
    return values[:, :k], indices


def score(queries: Tensor, database: Any, similarity: str | Callable[..., Tensor] = "smooth_chamfer", *,
          query_mask: Tensor | None = None, database_mask: Any = None, block_size: int | tuple[int, int] | None = None,
          topk: int | None = None, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """Score every query set against every gallery set in tiles (M§6: COCO 5K is 20,000 × 100,000 elements).

    Tiles over both queries and gallery, so peak memory is one ``[Bq·K, Bg·L]`` tile plus the output and never
    grows with ``B·G·K·L``. Queries are normalised once; each gallery block is loaded, converted with
    ``torch.as_tensor`` and normalised once, then scored against every query block. Autograd is kept only when an
    input (or a tensor kwarg) requires grad; otherwise the work runs under ``torch.no_grad()``.

    Args:
        queries: [B, K, D] float tensor.
        database: [G, L, D] float tensor, or an array-like with ``.shape`` whose row slices give numpy (zarr).
        similarity: a registered name (``list_similarities()``), a ``create_similarity`` callable, or any callable
            ``(a, b, a_mask=None, b_mask=None, **kwargs) -> [N, M]``.
        query_mask: [B, K] bool or None. database_mask: [G, L] bool (tensor or array-like) or None.
        block_size: (query, gallery) sets per tile, or one int for both; None picks ~64 MB tiles.
        topk: if set, return only the k best gallery items per query, merged block by block without materialising
            [B, G]. Ties: the lower gallery index ranks first.
        **kwargs: hyper-parameters of the similarity (``alpha=16.0``, ...).

    Returns:
        [B, G] float32 (float64 for float64 queries) scores, or with ``topk=k`` a pair ``(scores [B, k],
        indices [B, k] int64)`` sorted best first.
    """
    _check_sets("queries", queries, query_mask)
    _check_sets("database", database, database_mask, width=queries.shape[2])
    B, K, D = queries.shape
    G, L, _ = database.shape
    if topk is not None and not 1 <= topk <= G:
        raise ValueError(f"topk must be in [1, G={G}] (database {tuple(database.shape)}), got {topk}")
    name = similarity if isinstance(similarity, str) else None
    if isinstance(similarity, functools.partial) and similarity.func in _NAME_OF and not similarity.args:
        name, kwargs = _NAME_OF[similarity.func], {**similarity.keywords, **kwargs}
    if name is not None:
        SIMILARITIES.get(name)  # unknown name -> ValueError listing the known ones
        kwargs = _resolve_kwargs(name, kwargs)
    kernel = _KERNELS[name] if name is not None and K > 0 and L > 0 else None
    bq, bg = _block_sizes(block_size, kernel.cost_per_pair(K, L, kwargs) if kernel else K * L)
    device = queries.device
    dtype = _compute_dtype(queries.dtype, *([database.dtype] if isinstance(database, Tensor) else []))
    grad = _needs_grad(queries, database, *kwargs.values())
    query_mask = None if query_mask is None else query_mask.to(device)
    starts = range(0, B, bq)
    with contextlib.nullcontext() if grad else torch.no_grad():
        if kernel is not None:
            prepared = kernel.prepare(queries, query_mask, dtype, False)  # normalised once
            tile_kwargs = {**kwargs, "workspace": _Workspace()} if kernel.workspace else kwargs
            tile_fn = functools.partial(_prepared_tile, kernel, prepared, tile_kwargs)
        else:
            func = similarity if name is None else functools.partial(_apply, name)
            tile_fn = functools.partial(_raw_tile, func, queries, query_mask, kwargs)
        out = torch.empty(B, G, dtype=dtype, device=device) if not grad and topk is None else None
        columns: list[Tensor] = []  # grad path: [B, Gt] per gallery block
        best = [_empty_topk(min(b0 + bq, B) - b0, dtype, device) for b0 in starts]  # running top-k per query block
        for g0 in range(0, G, bg):
            g1 = min(g0 + bg, G)
            block, block_mask = _rows(database, g0, g1, device), _rows(database_mask, g0, g1, device)
            gallery = kernel.prepare(block, block_mask, dtype, True) if kernel else (block, block_mask)  # once/block
            tiles = []
            for i, b0 in enumerate(starts):
                b1 = min(b0 + bq, B)
                tile = tile_fn(b0, b1, gallery).to(dtype)  # [Bt, Gt]
                if topk is not None:
                    best[i] = _merge_topk(*best[i], tile, g0, topk)
                elif out is not None:
                    out[b0:b1, g0:g1] = tile
                else:
                    tiles.append(tile)
            if tiles:
                columns.append(torch.cat(tiles, 0))  # [B, Gt]
    if topk is not None:
        return torch.cat([v for v, _ in best], 0), torch.cat([i for _, i in best], 0)
    if out is not None:
        return out
    return torch.cat(columns, 1) if columns else torch.empty(B, G, dtype=dtype, device=device)


def _prepared_tile(kernel: _Kernel, queries: _Sets, kwargs: dict[str, Any], b0: int, b1: int, gallery: _Sets) -> Tensor:
    return kernel.pair(queries.rows(b0, b1), gallery, **kwargs)  # [Bt, Gt]


def _raw_tile(func: Callable[..., Tensor], queries: Tensor, query_mask: Tensor | None, kwargs: dict[str, Any],
              b0: int, b1: int, gallery: tuple[Tensor, Tensor | None]) -> Tensor:  # fmt: skip
    q_mask = None if query_mask is None else query_mask[b0:b1]
    return func(queries[b0:b1], gallery[0], a_mask=q_mask, b_mask=gallery[1], **kwargs)  # [Bt, Gt]


def _empty_topk(rows: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(rows, 0, dtype=dtype, device=device), torch.empty(rows, 0, dtype=torch.long, device=device)
