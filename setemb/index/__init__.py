"""Searchable index over a database of embedding sets: FAISS candidates over elements, exact set re-ranking.

The database holds ``G`` sets ``[G, K, D]`` (K elements each); a query is a set ``[L, D]``. ``SetIndex`` (below)
builds and searches it; its three parts live in their own modules:

1. ``candidates``: a FAISS index over the ``G·K`` individual elements; each query element's top-``C`` hits, unioned
   per query, are the candidate items. Index kinds (``flat`` / ``ivf`` / ``hnsw``), ``default_index_params`` by
   database size, and why the candidates hold the exact top-k are documented there.
2. ``rerank``: exact re-ranking of each query's own candidates with the configured set similarity (smooth-Chamfer,
   DivE eq. 7, α = 16 by default), then top-k; the re-ranking vectors (float16 in RAM, on disk in zarr, or
   memory-mapped) and the tie rule are documented there.
3. ``persistence``: ``save`` / ``load`` of one directory (FAISS index, ids, vectors, config).

Threads: faiss-cpu and torch ship separate OpenMP runtimes; with both pools spinning on a small CPU, one-query
searches ran 2-5x slower on the 2-core dev box. Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment of processes that
search (the benchmark does); this package never changes global thread settings.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from setemb.index.candidates import (
    INDEX_KINDS,
    add_elements,
    as_float32,
    candidate_items,
    default_index_params,
    new_element_index,
    set_search_params,
    train_elements,
)
from setemb.index.persistence import load_index, save_index
from setemb.index.rerank import SetVectors, paired_scores, read_rows, rerank
from setemb.similarity import create_similarity

logger = logging.getLogger(__name__)


class SetIndex:
    """FAISS element index + exact set re-ranking (candidate rule and kinds: ``candidates``; storage, ties: ``rerank``).

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
        self.faiss_index = new_element_index(kind, dim, nlist=nlist, hnsw_m=hnsw_m, ef_construction=ef_construction)
        self.item_ids = np.empty(0, np.int64)  # [G] external id of each internal position
        self.vectors = SetVectors(storage_dtype)

    # ------------------------------------------------------------------------------------------- build

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
        x = as_float32(sample)
        if x.ndim == 3:
            self._check_sets("sample", x, "[n, K, D]")
            x = x.reshape(-1, x.shape[2])  # [n*K, D]
        if x.ndim != 2 or x.shape[1] != self.config["dim"]:
            raise ValueError(f"sample: expected [n, K, D] or [n, {self.config['dim']}], got shape {x.shape}")
        train_elements(self.faiss_index, self.config["kind"], self.config["nlist"], x)

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

    def add(self, sets: Any, ids: Any = None) -> None:
        """Append ``sets [n, K, D]`` (incremental: positions continue, nothing is rebuilt).

        Args:
            sets: [n, K, D] float (torch or numpy), rows L2-normalised (FAISS gets normalised copies anyway).
            ids: [n] int external item ids; default continues ``len(self), len(self) + 1, ...``.
        """
        self._check_sets("sets", sets, "[n, K, D]")
        block = as_float32(sets)  # [n, K, D]
        if not self.is_trained:
            self._ensure_trained(self._training_sample(block))
        self._add_ids(len(block), ids)
        add_elements(self.faiss_index, block)
        self.vectors.append(block)

    def _training_sample(self, sets: Any) -> np.ndarray:
        """Up to ``train_size`` elements from random sets of ``sets`` (numpy or zarr), sorted reads."""
        K = self.config["num_elements"]
        G = sets.shape[0]
        n = min(G, max(1, math.ceil(self.config["train_size"] / K)))
        rows = np.sort(np.random.default_rng(self.config["seed"]).choice(G, n, replace=False))
        return as_float32(read_rows(sets, rows))  # [n, K, D]

    def add_from_store(self, source: Any, block_size: int = 8192, *, ids: Any = None,
                       keep_on_disk: bool = False) -> None:  # fmt: skip
        """Stream sets from a zarr array in blocks: peak memory is one block plus the index, never the store.

        Args:
            source: zarr array [n, K, D], or the path of one (a group path uses its ``embeddings`` array, the
                layout of ``setemb.embedding_store``).
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
            block = as_float32(array[start : min(start + block_size, n)])  # [b, K, D]
            add_elements(self.faiss_index, block)
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
        self.vectors = SetVectors(str(np.dtype(array.dtype)))
        self.vectors.reference(array)

    # ------------------------------------------------------------------------------------------- search

    def search(self, queries: Any, k: int = 10) -> tuple[Tensor, Tensor]:
        """Top-k database sets for each query set: FAISS candidates, then exact re-ranking (package docstring).

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
        q = torch.as_tensor(as_float32(queries))  # [Q, L, D]
        Q = q.shape[0]
        scores = torch.full((Q, k), float("-inf"))
        ids = torch.full((Q, k), -1, dtype=torch.long)
        if Q == 0 or len(self) == 0 or shape[1] == 0:
            return scores, ids
        set_search_params(self.faiss_index, self.config["kind"], nprobe=self.nprobe, ef_search=self.ef_search,
                          candidates=self.candidates_per_element)  # fmt: skip
        for b0 in range(0, Q, self.query_block_size):
            b1 = min(b0 + self.query_block_size, Q)
            scores[b0:b1], ids[b0:b1] = self._search_block(q[b0:b1], k)
        return scores, ids

    def _search_block(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        items, valid = candidate_items(self.faiss_index, q, self.candidates_per_element, self.config["num_elements"])
        return rerank(q, items, valid, self.vectors, self.item_ids, k, self.paired_scores)  # [Qb, k] x 2

    def paired_scores(self, queries: Tensor, candidates: Tensor) -> Tensor:
        """Similarity of each query with its own candidates only (``rerank.paired_scores``).

        Args:
            queries: [Q, L, D] float. candidates: [Q, C, K, D] float.

        Returns:
            [Q, C] float32 scores, the same values as ``similarity.score`` gives for those pairs.
        """
        name, kw = self.config["similarity"], self.config["similarity_kwargs"]
        return paired_scores(queries, candidates, name, kw, self._similarity)

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, directory: str | Path, block_size: int = 65536) -> None:
        """Write ``index.faiss``, ``config.json``, ``item_ids.npy`` and ``vectors.npy`` (streamed in blocks)."""
        save_index(self, directory, block_size)

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = True) -> SetIndex:
        """Rebuild an index written by ``save``; ``mmap`` keeps ``vectors.npy`` on disk (memory-mapped, read-only)."""
        return load_index(cls, directory, mmap=mmap)


__all__ = ["INDEX_KINDS", "SetIndex", "default_index_params"]
