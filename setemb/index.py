"""Searchable index over a database of embedding sets: FAISS candidates over elements, exact set re-ranking.

The database holds ``G`` sets ``[G, K, D]`` (K elements each); a query is a set ``[L, D]``. Search has two steps:

1. **Candidates** (FAISS over the ``G·K`` individual elements, element ``g·K + k`` belongs to item ``g``): each of
   the L query elements takes its top-``C`` element hits (``C = candidates_per_element``); the union of their item
   ids, deduplicated per query, is the candidate set (at most ``L·C`` items).
2. **Exact re-ranking** of the candidates with the configured set similarity (smooth-Chamfer, DivE eq. 7, α = 16 by
   default), per query against its own candidates only (``einsum("qld,qckd->qclk")``), then top-k.

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

Vectors for re-ranking: kept as float16 by default (``storage_dtype``; half the memory of float32, cosines change by
~1e-3, see benchmarks/bench_search.py for the measured recall impact), in RAM, or left on disk in the zarr array they
were streamed from (``add_from_store(..., keep_on_disk=True)``; candidate rows are read with ``oindex``), or
memory-mapped from ``vectors.npy`` after ``SetIndex.load``. FAISS itself keeps float32 element copies (4·E·D bytes).

Threads: faiss-cpu and torch ship separate OpenMP runtimes; with both pools spinning on a small CPU, one-query
searches ran 2-5x slower on the 2-core dev box. Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment of processes that
search (the benchmark does); this module never changes global thread settings.

Tie rule: equal scores rank the item added earlier first (lower internal position), as ``similarity.score`` ranks
the lower gallery index first. Fewer than k candidates: the tail is padded with score ``-inf`` and id ``-1``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from torch import Tensor

from setemb.similarity import create_similarity

logger = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
_FORMAT = "setemb.index/1"
_FLAT_MAX_ELEMENTS = 250_000
_PAIRED = ("smooth_chamfer", "chamfer", "max_similarity", "mean_similarity")  # batched einsum re-rank


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


def _numpy_f32(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows of ``x [n, D]`` L2-normalised (zero rows stay zero), float32, contiguous (FAISS inner product)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _rows(array: Any, positions: np.ndarray) -> np.ndarray:
    """Rows ``positions`` (sorted, unique) of a numpy / memmap array or a zarr array (``oindex``)."""
    if isinstance(array, zarr.Array):
        return np.asarray(array.oindex[positions])
    return np.asarray(array[positions])


class _Vectors:
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
                parts.append(_rows(array, positions[lo:hi] - start).astype(np.float32, copy=False))
            start += size
        return np.concatenate(parts, 0)

    def blocks(self, block_size: int):
        """Yield consecutive ``[b, K, D]`` blocks of all rows (saving)."""
        for array, size, _ in self.segments:
            for s in range(0, size, block_size):
                yield np.asarray(array[s : min(s + block_size, size)])


class SetIndex:
    """FAISS element index + exact set re-ranking (module docstring: candidate rule, kinds, storage, ties).

    Args:
        dim: element width D. num_elements: K, elements per database set.
        kind: ``"flat"``, ``"ivf"`` or ``"hnsw"`` (``default_index_params`` picks one by size).
        similarity: registered similarity name used for re-ranking (``list_similarities()``).
        similarity_kwargs: its hyper-parameters, e.g. ``{"alpha": 16.0}``.
        candidates_per_element: C, element hits taken per query element.
        nlist: IVF cells. nprobe: IVF cells visited per query element.
        hnsw_m: HNSW links per node. ef_construction: HNSW build beam. ef_search: HNSW search beam (raised to C).
        storage_dtype: ``"float16"`` or ``"float32"`` for the in-RAM re-ranking vectors.
        query_block_size: queries re-ranked together (memory ~ block·L·C·K·D·4 bytes).
        train_size: elements sampled to train IVF when ``train`` is implicit (first add / store).
        seed: sampling seed for implicit training.
    """

    def __init__(self, dim: int, num_elements: int, *, kind: str = "flat", similarity: str = "smooth_chamfer",
                 similarity_kwargs: dict[str, Any] | None = None, candidates_per_element: int = 64,
                 nlist: int = 1024, nprobe: int = 32, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 128, storage_dtype: str = "float16", query_block_size: int = 64,
                 train_size: int = 100_000, seed: int = 0) -> None:  # fmt: skip
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
        if storage_dtype not in ("float16", "float32"):
            raise ValueError(f"storage_dtype must be 'float16' or 'float32', got {storage_dtype!r}")
        for key, value in dict(dim=dim, num_elements=num_elements, candidates_per_element=candidates_per_element,
                               nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_construction=ef_construction,
                               ef_search=ef_search, query_block_size=query_block_size,
                               train_size=train_size).items():  # fmt: skip
            if int(value) < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        self.config: dict[str, Any] = dict(
            dim=dim, num_elements=num_elements, kind=kind, similarity=similarity,
            similarity_kwargs=dict(similarity_kwargs or {}), nlist=nlist, hnsw_m=hnsw_m,
            ef_construction=ef_construction, storage_dtype=storage_dtype, train_size=train_size, seed=seed,
        )  # fmt: skip
        self._similarity = create_similarity(similarity, **self.config["similarity_kwargs"])  # validates name/kwargs
        self.candidates_per_element = candidates_per_element
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.query_block_size = query_block_size
        self.faiss_index = self._new_faiss_index()
        self.item_ids = np.empty(0, np.int64)  # [G] external id of each internal position
        self.vectors = _Vectors(storage_dtype)

    # ------------------------------------------------------------------------------------------- build

    def _new_faiss_index(self) -> faiss.Index:
        D, kind = self.config["dim"], self.config["kind"]
        if kind == "flat":
            return faiss.IndexFlatIP(D)
        if kind == "ivf":
            self._quantizer = faiss.IndexFlatIP(D)  # referenced by the IVF index: keep it alive
            return faiss.IndexIVFFlat(self._quantizer, D, self.config["nlist"], faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexHNSWFlat(D, self.config["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.config["ef_construction"]
        return index

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def is_trained(self) -> bool:
        return bool(self.faiss_index.is_trained)

    def _check_sets(self, name: str, sets: Any, shape_hint: str) -> None:
        K, D = self.config["num_elements"], self.config["dim"]
        shape = tuple(sets.shape)
        if len(shape) != 3 or shape[1] != K or shape[2] != D:
            raise ValueError(f"{name}: expected {shape_hint} = [n, {K}, {D}], got shape {shape}")

    def train(self, sample: Any) -> None:
        """Train IVF cells on ``sample`` ([n, K, D] sets or [n, D] elements); a no-op for flat / HNSW."""
        x = _numpy_f32(sample)
        if x.ndim == 3:
            self._check_sets("sample", x, "[n, K, D]")
            x = x.reshape(-1, x.shape[2])  # [n*K, D]
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"sample: expected [n, K, D] or [n, {self.config['dim']}], got shape {x.shape}")
        if self.config["kind"] != "ivf":
            return
        if len(x) < self.config["nlist"]:
            raise ValueError(f"IVF training needs >= nlist={self.config['nlist']} elements, got {len(x)}")
        self.faiss_index.train(_normalised(x))

    def _ensure_trained(self, sample: Any) -> None:
        if not self.is_trained:
            logger.info("training %s index on %d sets", self.config["kind"], len(sample))
            self.train(sample)

    def _add_ids(self, n: int, ids: Any) -> None:
        if ids is None:
            ids = np.arange(len(self), len(self) + n, dtype=np.int64)
        ids = ids.cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        if ids.shape != (n,):
            raise ValueError(f"ids: expected shape ({n},) (one per set), got {tuple(ids.shape)}")
        self.item_ids = np.concatenate([self.item_ids, ids.astype(np.int64)])

    def _add_elements(self, block: np.ndarray) -> None:
        n, K, D = block.shape
        self.faiss_index.add(_normalised(block.reshape(n * K, D)))  # elements g*K + k, in order

    def add(self, sets: Any, ids: Any = None) -> None:
        """Append ``sets [n, K, D]`` (incremental: positions continue, nothing is rebuilt).

        Args:
            sets: [n, K, D] float (torch or numpy), rows L2-normalised (FAISS gets normalised copies anyway).
            ids: [n] int external item ids; default continues ``len(self), len(self) + 1, ...``.
        """
        self._check_sets("sets", sets, "[n, K, D]")
        block = _numpy_f32(sets)  # [n, K, D]
        if not self.is_trained:
            self._ensure_trained(self._training_sample(block))
        self._add_ids(len(block), ids)
        self._add_elements(block)
        self.vectors.append(block)

    def _training_sample(self, sets: Any) -> np.ndarray:
        """Up to ``train_size`` elements from random sets of ``sets`` (numpy or zarr), sorted reads."""
        K = self.config["num_elements"]
        G = sets.shape[0]
        n = min(G, max(1, math.ceil(self.config["train_size"] / K)))
        rows = np.sort(np.random.default_rng(self.config["seed"]).choice(G, n, replace=False))
        return _numpy_f32(_rows(sets, rows))  # [n, K, D]

    def add_from_store(self, source: Any, block_size: int = 8192, *, ids: Any = None,
                       keep_on_disk: bool = False) -> None:  # fmt: skip
        """Stream sets from a zarr array in blocks: peak memory is one block plus the index, never the store.

        Args:
            source: zarr array [n, K, D], or the path of one (a group path uses its ``embeddings`` array, the
                embedding-store layout of ``setemb.store``).
            block_size: sets read per block.
            ids: [n] int external item ids (default: positions continue).
            keep_on_disk: re-rank by reading candidate rows from ``source`` (``oindex``) instead of copying the
                vectors into RAM as ``storage_dtype``.
        """
        array = source
        if isinstance(source, (str, Path)):
            array = zarr.open(str(source), mode="r")
            if isinstance(array, zarr.Group):
                array = array["embeddings"]
        self._check_sets("store", array, "[n, K, D]")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        n = array.shape[0]
        if n and not self.is_trained:
            self._ensure_trained(self._training_sample(array))
        self._add_ids(n, ids)
        for start in range(0, n, block_size):
            block = _numpy_f32(array[start : min(start + block_size, n)])  # [b, K, D]
            self._add_elements(block)
            if not keep_on_disk:
                self.vectors.append(block)
        if keep_on_disk:
            self.vectors.reference(array)

    def set_vectors(self, array: Any) -> None:
        """Re-rank from ``array [len(self), K, D]`` (numpy, memmap or zarr; same rows in the same order) in place of
        the stored vectors, without copying (e.g. the float32 source instead of float16 copies)."""
        self._check_sets("array", array, "[n, K, D]")
        if array.shape[0] != len(self):
            raise ValueError(f"array: expected {len(self)} sets (one per indexed set), got shape {tuple(array.shape)}")
        self.vectors = _Vectors(str(np.dtype(array.dtype)))
        self.vectors.reference(array)

    # ------------------------------------------------------------------------------------------- search

    def _set_search_params(self) -> None:
        kind = self.config["kind"]
        if kind == "ivf":
            self.faiss_index.nprobe = int(self.nprobe)
        elif kind == "hnsw":
            self.faiss_index.hnsw.efSearch = int(max(self.ef_search, self.candidates_per_element))

    def search(self, queries: Any, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-k database sets for each query set: FAISS candidates, then exact re-ranking (module docstring).

        Args:
            queries: [Q, L, D] float (torch or numpy); L may differ from K.
            k: results per query, ``1 <= k``.

        Returns:
            ``(scores [Q, k] float32, item_ids [Q, k] int64)`` best first; padded with ``-inf`` / ``-1`` when fewer
            than k candidates exist.
        """
        shape = tuple(queries.shape)
        if len(shape) != 3 or shape[2] != self.config["dim"]:
            raise ValueError(f"queries: expected [Q, L, {self.config['dim']}], got shape {shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = torch.as_tensor(_numpy_f32(queries))  # [Q, L, D]
        Q = q.shape[0]
        scores = torch.full((Q, k), float("-inf"))
        ids = torch.full((Q, k), -1, dtype=torch.long)
        if Q == 0 or len(self) == 0 or shape[1] == 0:
            return scores, ids
        self._set_search_params()
        for b0 in range(0, Q, self.query_block_size):
            b1 = min(b0 + self.query_block_size, Q)
            scores[b0:b1], ids[b0:b1] = self._search_block(q[b0:b1], k)
        return scores, ids

    def _candidates(self, q: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """FAISS hits of every query element -> per-query unique item positions ``[Qb, Cm]`` (ascending) + mask."""
        Qb, L, D = q.shape
        K = self.config["num_elements"]
        C = min(self.candidates_per_element, self.faiss_index.ntotal)
        _, hits = self.faiss_index.search(_normalised(q.reshape(Qb * L, D).numpy()), C)  # [Qb*L, C] element ids
        items = np.where(hits >= 0, hits // K, np.iinfo(np.int64).max).reshape(Qb, L * C)  # [Qb, L*C]
        items.sort(axis=1)
        dup = np.zeros_like(items, dtype=bool)
        dup[:, 1:] = items[:, 1:] == items[:, :-1]
        items[dup] = np.iinfo(np.int64).max
        items.sort(axis=1)  # unique positions first, ascending (the tie rule), padding last
        valid = items != np.iinfo(np.int64).max  # [Qb, L*C]
        width = max(1, int(valid.sum(1).max()))
        return items[:, :width], valid[:, :width]

    def _search_block(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        Qb, L, D = q.shape
        items, valid = self._candidates(q)  # [Qb, Cm]
        unique, inverse = np.unique(items[valid], return_inverse=True)
        rows = torch.from_numpy(self.vectors.gather(unique))  # [U, K, D]
        slot = np.zeros(items.shape, np.int64)
        slot[valid] = inverse
        candidates = rows[torch.from_numpy(slot)]  # [Qb, Cm, K, D]
        sims = self.paired_scores(q, candidates)  # [Qb, Cm]
        sims = sims.masked_fill(~torch.from_numpy(valid), float("-inf"))
        kk = min(k, sims.shape[1])
        top, order = torch.sort(sims, dim=1, descending=True, stable=True)  # ties: lower position first
        positions = torch.from_numpy(items).gather(1, order[:, :kk])  # [Qb, kk]
        found = top[:, :kk] > float("-inf")
        out_ids = torch.from_numpy(self.item_ids)[positions.clamp_max(len(self) - 1)].masked_fill(~found, -1)
        scores = torch.full((Qb, k), float("-inf"))
        ids = torch.full((Qb, k), -1, dtype=torch.long)
        scores[:, :kk], ids[:, :kk] = top[:, :kk].float(), out_ids
        return scores, ids

    def paired_scores(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """Similarity of each query with its own candidates only (no all-vs-all).

        Smooth-Chamfer (DivE eq. 7, M§3): ``1/(2α) [mean_l LSE_k(α C_lk) + mean_k LSE_l(α C_lk)]``; chamfer, max and
        mean reduce the same cosine tile ``C = einsum("qld,qckd->qclk")``. Other similarities call the registered
        function query by query.

        Args:
            queries: [Q, L, D] float. candidates: [Q, C, K, D] float.

        Returns:
            [Q, C] float32 scores, the same values as ``similarity.score`` gives for those pairs.
        """
        Q, L, D = queries.shape
        name, kw = self.config["similarity"], self.config["similarity_kwargs"]
        if name not in _PAIRED:
            return torch.stack([self._similarity(queries[i : i + 1], candidates[i])[0] for i in range(Q)])
        qn = F.normalize(queries.float(), dim=-1)  # [Q, L, D]
        cn = F.normalize(candidates.float(), dim=-1)  # [Q, C, K, D]
        cos = torch.einsum("qld,qckd->qclk", qn, cn)  # [Q, C, L, K]
        if name == "smooth_chamfer":
            alpha = float(kw.get("alpha", 16.0))
            z = cos * alpha
            return (torch.logsumexp(z, 3).mean(2) + torch.logsumexp(z, 2).mean(2)) / (2 * alpha)
        if name == "chamfer":
            return 0.5 * (cos.amax(3).mean(2) + cos.amax(2).mean(2))
        if name == "max_similarity":
            return cos.amax(dim=(2, 3))
        return cos.mean(dim=(2, 3))

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, directory: str | Path, block_size: int = 65536) -> None:
        """Write ``index.faiss``, ``config.json``, ``item_ids.npy`` and ``vectors.npy`` (streamed in blocks)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.faiss_index, str(out / "index.faiss"))
        np.save(out / "item_ids.npy", self.item_ids)
        K, D = self.config["num_elements"], self.config["dim"]
        dtype = self.vectors.dtype
        vectors = np.lib.format.open_memmap(out / "vectors.npy", mode="w+", dtype=dtype, shape=(len(self), K, D))
        start = 0
        for block in self.vectors.blocks(block_size):
            vectors[start : start + len(block)] = block
            start += len(block)
        vectors.flush()
        del vectors
        search = dict(candidates_per_element=self.candidates_per_element, nprobe=self.nprobe,
                      ef_search=self.ef_search, query_block_size=self.query_block_size)  # fmt: skip
        meta = {"format": _FORMAT, "size": len(self), "config": {**self.config, **search}}
        (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> SetIndex:
        """Rebuild an index written by ``save``; ``mmap`` keeps ``vectors.npy`` on disk (memory-mapped, read-only)."""
        src = Path(directory)
        meta = json.loads((src / "config.json").read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{src}: expected format {_FORMAT!r}, got {meta.get('format')!r}")
        index = cls(**meta["config"])
        index.faiss_index = faiss.read_index(str(src / "index.faiss"))
        index.item_ids = np.load(src / "item_ids.npy")
        vectors = np.load(src / "vectors.npy", mmap_mode="r" if mmap else None)
        if mmap:
            index.vectors.reference(vectors)
        else:
            index.vectors.append(vectors)
        expected = meta["size"] * index.config["num_elements"]
        if len(index.item_ids) != meta["size"] or index.faiss_index.ntotal != expected:
            raise ValueError(f"{src}: inconsistent index ({meta['size']} sets expected)")
        return index


__all__ = ["INDEX_KINDS", "SetIndex", "default_index_params"]
