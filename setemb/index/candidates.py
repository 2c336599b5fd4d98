"""Step 1 of a ``SetIndex`` search: candidate items from a FAISS index over the individual set elements.

The database holds ``G`` sets ``[G, K, D]``; FAISS holds their ``G·K`` elements, element ``g·K + k`` belonging to
item ``g``. Each of the L query elements takes its top-``C`` element hits (``C = candidates_per_element``); the
union of their item ids, deduplicated per query, is the candidate set (at most ``L·C`` items), which
``setemb.index.rerank`` scores exactly.

Why the candidates hold the exact top-k (for smooth-Chamfer and the other cosine similarities). Every similarity
here is at most the best element pair plus a slack: with ``C_lk`` the cosines of query element l and item element k,
``LSE_k(α C_lk)/α <= max_k C_lk + log(K)/α``, so ``SC(q, g) <= max_lk C_lk + (log K + log L)/(2α)`` (slack 0 for
chamfer, max, mean and one-to-one assignment). An item none of whose elements is in any query element's top-C has
``max_lk C_lk <= T = max_l t_l`` (``t_l`` the C-th hit cosine of element l), hence ``SC <= T + slack``. So with an
exact element index the result is provably exact whenever the k-th re-ranked score is ``>= T + slack``, and in
practice far more often: SC is dominated by the best-matching pairs, so items that rank in the top-k have
elements very close to the query's elements (they are hits of rank << C), while items whose best pair sits below
the C-th hit of every query element score lower. Larger C tightens it (cost grows linearly in C); ANN kinds add
their own (tunable) element-recall loss.

Index kinds (``kind``) and defaults by database size (``default_index_params``; ``E = G·K`` elements):

* ``flat``: ``IndexFlatIP``, exact element search, no training; O(E·D) per query element. Default for E <= 250k.
* ``ivf``: ``IndexIVFFlat`` (inner product) with ``nlist`` k-means cells trained on a sample, ``nprobe`` cells
  visited per query element. Default above E = 250k with ``nlist ≈ √E`` (power of two, 256..16384; the k-means
  assignment cost of adding E elements is E·nlist·D, so 4√E is too slow on a small CPU box) and ``nprobe = nlist/32``
  (>= 16).
* ``hnsw``: ``IndexHNSWFlat`` (``hnsw_m`` links, ``ef_construction``, ``ef_search``); best latency/recall but the
  slowest build and ~``hnsw_m·8`` bytes per element of graph: pick it explicitly for read-heavy mid-size databases.

FAISS keeps float32 copies of the elements (4·E·D bytes), L2-normalised so that inner product is cosine.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
from torch import Tensor

INDEX_KINDS = ("flat", "ivf", "hnsw")
_FLAT_MAX_ELEMENTS = 250_000


def default_index_params(num_items: int, num_elements: int) -> dict[str, Any]:
    """Index kind and parameters for ``num_items`` sets of ``num_elements`` (K) elements (see the module docstring).

    Returns:
        ``{"kind": "flat"}`` for up to 250k elements, else ``{"kind": "ivf", "nlist": ..., "nprobe": ...}``.
    """
    total = num_items * num_elements
    if total <= _FLAT_MAX_ELEMENTS:
        return {"kind": "flat"}
    nlist = int(min(16384, max(256, 2 ** round(math.log2(math.sqrt(total))))))
    # nlist/32 probes: recall@10 0.998 of exact at 1M sets (nlist/64: 0.989), ~20 ms per query (bench_search.py)
    return {"kind": "ivf", "nlist": nlist, "nprobe": max(16, nlist // 32)}


def as_float32(x: Any) -> np.ndarray:
    """``x`` (torch or numpy) as a contiguous float32 numpy array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [n, D]`` L2-normalised (zero rows stay zero), float32, contiguous (FAISS inner product)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def new_element_index(kind: str, dim: int, *, nlist: int, hnsw_m: int, ef_construction: int) -> faiss.Index:
    """An empty inner-product FAISS index of ``kind`` over D = ``dim`` wide elements."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)  # faiss's Python wrapper keeps it alive with the IVF index
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    return index


def train_elements(index: faiss.Index, kind: str, nlist: int, elements: np.ndarray) -> None:
    """Train IVF cells on ``elements [n, D]`` float32 (normalised copies); a no-op for flat / HNSW."""
    if kind != "ivf":
        return
    if len(elements) < nlist:
        raise ValueError(f"IVF training needs >= nlist={nlist} elements, got {len(elements)}")
    index.train(normalised(elements))


def add_elements(index: faiss.Index, block: np.ndarray) -> None:
    """Append the elements of ``block [n, K, D]`` float32: element ``g·K + k`` of the index is set g's k-th."""
    n, K, D = block.shape
    index.add(normalised(block.reshape(n * K, D)))  # elements g*K + k, in order


def set_search_params(index: faiss.Index, kind: str, *, nprobe: int, ef_search: int, candidates: int) -> None:
    """IVF ``nprobe`` / HNSW ``efSearch`` (at least C = ``candidates``, the hits asked per query element)."""
    if kind == "ivf":
        index.nprobe = int(nprobe)
    elif kind == "hnsw":
        index.hnsw.efSearch = int(max(ef_search, candidates))


def candidate_items(index: faiss.Index, q: Tensor, candidates: int, num_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """FAISS hits of every query element -> per-query unique item positions ``[Qb, Cm]`` (ascending) + mask.

    Args:
        index: the element index (``num_elements`` = K elements per item, in item order).
        q: ``[Qb, L, D]`` float32 query sets.
        candidates: C, hits taken per query element (capped at the number of indexed elements).

    Returns:
        ``items [Qb, Cm]`` int64 item positions, ascending per row (the tie rule), padding last, and
        ``valid [Qb, Cm]`` bool (False = padding); ``Cm <= L·C``.
    """
    Qb, L, D = q.shape
    K = num_elements
    C = min(candidates, index.ntotal)
    _, hits = index.search(normalised(q.reshape(Qb * L, D).numpy()), C)  # [Qb*L, C] element ids
    items = np.where(hits >= 0, hits // K, np.iinfo(np.int64).max).reshape(Qb, L * C)  # [Qb, L*C]
    items.sort(axis=1)
    dup = np.zeros_like(items, dtype=bool)
    dup[:, 1:] = items[:, 1:] == items[:, :-1]
    items[dup] = np.iinfo(np.int64).max
    items.sort(axis=1)  # unique positions first, ascending (the tie rule), padding last
    valid = items != np.iinfo(np.int64).max  # [Qb, L*C]
    width = max(1, int(valid.sum(1).max()))
    return items[:, :width], valid[:, :width]
