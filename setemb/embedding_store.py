"""Zarr embedding store: the trained model's embedding sets, one named set per split and modality.

Layout (the shared conventions of ``setemb.store``: format tag, completion marker, resumable units)::

    <root>/                       attrs: format, complete, + caller attrs (similarity, model digest, ...)
      <name>/                     e.g. ``test/image``; attrs: count, num_embeddings, embed_dim, attention_tokens,
                                  unit_size, num_units, complete, + caller attrs
        embeddings [N, K, D] float32       one shard per ``unit_size`` items, zstd chunks of ``ROWS_PER_CHUNK``
        attention  [N, K, Ntok] float32    only when created with ``attention_tokens``
        ids        [N] string
        caption_to_image [N] int64         only when given (text sets)
        done       [num_units] bool        one chunk per work unit; True once the unit is fully written
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from setemb.store import StoreView, as_numpy, as_strings, check_layout, mark_complete, mark_incomplete, open_for_writing

EMBEDDING_FORMAT = "setemb.embeddings/1"
# Rows per compressed chunk inside each unit's shard: a compressed index re-ranks a few random rows per query
# (setemb.index.compressed), and a miss then decodes 16 sets, not a whole 1,024-set unit.
ROWS_PER_CHUNK = 16


# ------------------------------------------------------------------------------------------------ embedding store
class EmbeddingSetWriter:
    """Writes one named embedding set ``[N, K, D]`` float32 (+ attention ``[N, K, Ntok]``) in units of items."""

    def __init__(self, path: str | Path, name: str) -> None:
        self.path, self.name = str(path), name
        self._group: zarr.Group | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None}

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r+", use_consolidated=False)[self.name]
        return self._group

    @property
    def num_units(self) -> int:
        return int(self.group.attrs["num_units"])

    def unit_items(self, unit: int) -> tuple[int, int]:
        size, n = int(self.group.attrs["unit_size"]), int(self.group.attrs["count"])
        if not 0 <= unit < self.num_units:
            raise ValueError(f"unit {unit} out of range [0, {self.num_units})")
        return unit * size, min(n, (unit + 1) * size)

    def remaining_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(~self.group["done"][:])]

    def write_unit(self, unit: int, embeddings: Any, attention: Any | None = None) -> None:
        """Write ``embeddings [b, K, D]`` (and ``attention [b, K, Ntok]``) of ``unit``; marks it done last."""
        lo, hi = self.unit_items(unit)
        g = self.group
        emb = as_numpy(embeddings).astype(np.float32)
        if emb.shape != (hi - lo, *g["embeddings"].shape[1:]):
            raise ValueError(f"embeddings must be {(hi - lo, *g['embeddings'].shape[1:])}, got {emb.shape}")
        g["embeddings"][lo:hi] = emb
        if "attention" in g:
            if attention is None:
                raise ValueError(f"embedding set {self.name} stores attention; got attention=None")
            att = as_numpy(attention).astype(np.float32)
            if att.shape != (hi - lo, *g["attention"].shape[1:]):
                raise ValueError(f"attention must be {(hi - lo, *g['attention'].shape[1:])}, got {att.shape}")
            g["attention"][lo:hi] = att
        g["done"][unit] = True

    def write_all(self, embeddings: Any, attention: Any | None = None) -> None:
        """Write every remaining unit from full ``[N, K, D]`` (and ``[N, K, Ntok]``) arrays."""
        for u in self.remaining_units():
            lo, hi = self.unit_items(u)
            self.write_unit(u, embeddings[lo:hi], None if attention is None else attention[lo:hi])


class EmbeddingStoreWriter:
    """Creates (or resumes) an embedding store of named sets (e.g. ``test/image``, ``test/text``)."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, attrs: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.root = open_for_writing(path, EMBEDDING_FORMAT, overwrite, attrs)

    def require_set(
        self,
        name: str,
        *,
        ids: Sequence[Any],
        num_embeddings: int,
        embed_dim: int,
        caption_to_image: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        attention_tokens: int | None = None,
        unit_size: int = 1024,
        attrs: dict[str, Any] | None = None,
    ) -> EmbeddingSetWriter:
        """Create set ``name`` with N = len(ids) items of K = num_embeddings x D = embed_dim, or reopen it.

        Args:
            attention_tokens: Ntok; when given, an ``attention [N, K, Ntok]`` float32 array is stored too.
            attrs: set attrs (e.g. the similarity name the model was trained with).
        """
        n = len(ids)
        layout = {
            "count": n,
            "num_embeddings": num_embeddings,
            "embed_dim": embed_dim,
            "attention_tokens": attention_tokens,
            "unit_size": unit_size,
            "num_units": math.ceil(n / unit_size),
        }
        if name in self.root:
            check_layout(self.root[name], layout, f"{self.path}/{name}")
            return EmbeddingSetWriter(self.path, name)
        mark_incomplete(self.root)
        g = self.root.create_group(name)
        zstd = ZstdCodec(level=3)
        kd = (num_embeddings, embed_dim)
        # one shard per unit (each writer owns whole shard files), small chunks inside it for random row reads
        rows = max(d for d in range(1, min(ROWS_PER_CHUNK, unit_size) + 1) if unit_size % d == 0)
        chunk = (rows, *kd)
        g.create_array(
            "embeddings", shape=(n, *kd), shards=(unit_size, *kd), chunks=chunk, dtype="float32", compressors=zstd
        )
        if attention_tokens is not None:
            shape = (n, num_embeddings, attention_tokens)
            g.create_array("attention", shape=shape, chunks=(unit_size, *shape[1:]), dtype="float32", compressors=zstd)
        g.create_array("ids", shape=(n,), chunks=(max(n, 1),), dtype=str)
        g["ids"][:] = as_strings(ids)
        if caption_to_image is not None:
            c2i = as_numpy(caption_to_image).astype(np.int64)
            if c2i.shape != (n,):
                raise ValueError(f"caption_to_image must be [{n}], got {c2i.shape}")
            g.create_array("caption_to_image", shape=(n,), chunks=(max(n, 1),), dtype="int64")
            g["caption_to_image"][:] = c2i
        g.create_array("done", shape=(layout["num_units"],), chunks=(1,), dtype=bool, fill_value=False)
        g.attrs.update({**(attrs or {}), **layout, "complete": False})
        return EmbeddingSetWriter(self.path, name)

    def finalize(self) -> None:
        """Check every set is fully written, set ``complete=True`` (last write), consolidate metadata."""
        for name, group in self.root.members(max_depth=None):
            if isinstance(group, zarr.Group) and "done" in group:
                missing = np.flatnonzero(~group["done"][:])
                if len(missing):
                    raise ValueError(f"embedding set {name}: {len(missing)} units not written")
                group.attrs["complete"] = True
        mark_complete(self.root, self.path)


@dataclass
class EmbeddingSet:
    """One embedding set read into memory.

    Attributes:
        embeddings: ``[N, K, D]`` float32.
        attention: ``[N, K, Ntok]`` float32 or None.
        ids: N item ids.
        caption_to_image: ``[N]`` int64 or None.
        attrs: set attrs.
    """

    embeddings: torch.Tensor
    attention: torch.Tensor | None
    ids: list[str]
    caption_to_image: np.ndarray | None
    attrs: dict[str, Any]


class EmbeddingStore(StoreView):
    """Read-only view of a finished embedding store."""

    _KIND, _FORMAT = "embedding", EMBEDDING_FORMAT

    @property
    def names(self) -> list[str]:
        return sorted(
            name for name, g in self.root.members(max_depth=None) if isinstance(g, zarr.Group) and "done" in g
        )

    def get(self, name: str) -> EmbeddingSet:
        if name not in self.root:
            raise KeyError(f"embedding store {self.path} has no set {name!r}; has {self.names}")
        g = self.root[name]
        return EmbeddingSet(
            embeddings=torch.from_numpy(g["embeddings"][:]),
            attention=torch.from_numpy(g["attention"][:]) if "attention" in g else None,
            ids=g["ids"][:].tolist(),
            caption_to_image=g["caption_to_image"][:] if "caption_to_image" in g else None,
            attrs=g.attrs.asdict(),
        )

    __getitem__ = get
