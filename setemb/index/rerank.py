"""Step 2 of a ``SetIndex`` search: exact set-similarity re-ranking of each query's own candidates.

The candidates of ``setemb.index.candidates`` are scored with the configured set similarity (smooth-Chamfer,
DivE eq. 7, α = 16 by default), per query against its own candidates only (``einsum("qld,qckd->qclk")``), then top-k.

Vectors for re-ranking (``SetVectors``): kept as float16 by default (``storage_dtype``; half the memory of float32,
cosines change by ~1e-3, see benchmarks/bench_search.py for the measured recall impact), in RAM, or left on disk in
the zarr array they were streamed from (``add_from_store(..., keep_on_disk=True)``; candidate rows are read with
``oindex``), or memory-mapped from ``vectors.npy`` after ``SetIndex.load``.

Tie rule: equal scores rank the item added earlier first (lower internal position), as ``similarity.score`` ranks
the lower gallery index first. Fewer than k candidates: the tail is padded with score ``-inf`` and id ``-1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor

PAIRED = ("smooth_chamfer", "chamfer", "max_similarity", "mean_similarity")  # batched einsum re-rank


def read_rows(array: Any, positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` (sorted, unique) of a numpy / memmap array or a zarr array (``oindex``)."""
    if isinstance(array, zarr.Array):
        return np.asarray(array.oindex[positions])
    return np.asarray(array[positions])


class SetVectors:
    """Item sets for re-ranking as segments ``[n_s, K, D]``: growable in-memory buffers or zarr / memmap arrays."""

    def __init__(self, dtype: str) -> None:
        self.dtype = np.dtype(dtype)
        self.segments: list[list[Any]] = []  # [array, size, growable]
        self.size = 0

    def append(self, block: np.ndarray) -> None:
        """Copy ``block [n, K, D]`` into RAM as ``self.dtype`` (amortised doubling, no rebuild)."""
        n = len(block)
        if not self.segments or not self.segments[-1][2]:
            self.segments.append([np.empty((max(n, 1), *block.shape[1:]), self.dtype), 0, True])
        seg = self.segments[-1]
        if seg[1] + n > len(seg[0]):
            grown = np.empty((max(2 * len(seg[0]), seg[1] + n), *block.shape[1:]), self.dtype)
            grown[: seg[1]] = seg[0][: seg[1]]
            seg[0] = grown
        seg[0][seg[1] : seg[1] + n] = block
        seg[1] += n
        self.size += n

    def reference(self, array: Any) -> None:
        """Use ``array [n, K, D]`` (zarr or memmap) in place; rows are read at search time."""
        self.segments.append([array, array.shape[0], False])
        self.size += array.shape[0]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """``positions [P]`` sorted unique int64 -> ``[P, K, D]`` float32."""
        parts, start = [], 0
        for array, size, _ in self.segments:
            lo, hi = np.searchsorted(positions, [start, start + size])
            if hi > lo:
                parts.append(read_rows(array, positions[lo:hi] - start).astype(np.float32, copy=False))
            start += size
        return np.concatenate(parts, 0)

    def blocks(self, block_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive ``[b, K, D]`` blocks of all rows (saving)."""
        for array, size, _ in self.segments:
            for s in range(0, size, block_size):
                yield np.asarray(array[s : min(s + block_size, size)])


def paired_scores(
    queries: Tensor,
    candidates: Tensor,
    similarity: str,
    similarity_kwargs: dict[str, Any],
    similarity_fn: Callable[..., Tensor],
) -> Tensor:
    """Similarity of each query with its own candidates only (no all-vs-all).

    Smooth-Chamfer (DivE eq. 7, M§3): ``1/(2α) [mean_l LSE_k(α C_lk) + mean_k LSE_l(α C_lk)]``; chamfer, max and
    mean reduce the same cosine tile ``C = einsum("qld,qckd->qclk")``. Other similarities call the registered
    function query by query.

    Args:
        queries: [Q, L, D] float. candidates: [Q, C, K, D] float.
        similarity: registered similarity name. similarity_kwargs: its hyper-parameters (``alpha``).
        similarity_fn: the registered function built from them (used for names outside ``PAIRED``).

    Returns:
        [Q, C] float32 scores, the same values as ``similarity.score`` gives for those pairs.
    """
    Q, L, D = queries.shape
    if similarity not in PAIRED:
        return torch.stack([similarity_fn(queries[i : i + 1], candidates[i])[0] for i in range(Q)])
    qn = F.normalize(queries.float(), dim=-1)  # [Q, L, D]
    cn = F.normalize(candidates.float(), dim=-1)  # [Q, C, K, D]
    cos = torch.einsum("qld,qckd->qclk", qn, cn)  # [Q, C, L, K]
    if similarity == "smooth_chamfer":
        alpha = float(similarity_kwargs.get("alpha", 16.0))
        z = cos * alpha
        return (torch.logsumexp(z, 3).mean(2) + torch.logsumexp(z, 2).mean(2)) / (2 * alpha)
    if similarity == "chamfer":
        return 0.5 * (cos.amax(3).mean(2) + cos.amax(2).mean(2))
    if similarity == "max_similarity":
        return cos.amax(dim=(2, 3))
    return cos.mean(dim=(2, 3))


def rerank(
    q: Tensor,
    items: np.ndarray,
    valid: np.ndarray,
    vectors: SetVectors,
    item_ids: np.ndarray,
    k: int,
    scorer: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """Score each query's candidates exactly and keep its top-k (module docstring: tie rule, padding).

    Args:
        q: [Qb, L, D] float32 query sets.
        items, valid: [Qb, Cm] candidate positions and mask (``candidates.candidate_items``).
        vectors: the indexed sets, by position. item_ids: [G] external id of each position.
        k: results per query.
        scorer: ``(queries [Qb, L, D], candidates [Qb, Cm, K, D]) -> [Qb, Cm]`` (``paired_scores``).

    Returns:
        ``(scores [Qb, k] float32, ids [Qb, k] int64)`` best first, padded with ``-inf`` / ``-1``.
    """
    Qb, L, D = q.shape
    unique, inverse = np.unique(items[valid], return_inverse=True)
    rows = torch.from_numpy(vectors.gather(unique))  # [U, K, D]
    slot = np.zeros(items.shape, np.int64)
    slot[valid] = inverse
    candidates = rows[torch.from_numpy(slot)]  # [Qb, Cm, K, D]
    sims = scorer(q, candidates)  # [Qb, Cm]
    sims = sims.masked_fill(~torch.from_numpy(valid), float("-inf"))
    kk = min(k, sims.shape[1])
    top, order = torch.sort(sims, dim=1, descending=True, stable=True)  # ties: lower position first
    positions = torch.from_numpy(items).gather(1, order[:, :kk])  # [Qb, kk]
    found = top[:, :kk] > float("-inf")
    out_ids = torch.from_numpy(item_ids)[positions.clamp_max(len(item_ids) - 1)].masked_fill(~found, -1)
    scores = torch.full((Qb, k), float("-inf"))
    ids = torch.full((Qb, k), -1, dtype=torch.long)
    scores[:, :kk], ids[:, :kk] = top[:, :kk].float(), out_ids
    return scores, ids
