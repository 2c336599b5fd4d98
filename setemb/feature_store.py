"""Zarr feature cache: the frozen backbones' features, ragged per item, written in resumable work units.

Feature store layout (one store per dataset x backbone pair)::

    <root>/                       attrs: format, complete, + caller attrs (dataset, backbones, ...)
      <split>/{image,text}/       attrs: backbone, local_dim, global_dim, local_dtype, grid, count, unit_size,
                                         max_tokens, rows_per_unit, num_units, complete
        local     [R, D] float16 (or [R] int32 token ids)   ragged rows, chunked along R, zstd
        starts    [n] int64        first row of item i in ``local`` (starts, not cumulative offsets)
        lengths   [n] int32        number of rows of item i
        global    [n, Dg] float16  absent when the backbone has no global feature (glove)
        ids       [n] string       item ids (zarr v3 variable-length UTF-8)
        caption_to_image [n] int64 text only: row of the caption's image in the same split
        done      [num_units] bool one chunk per work unit; True once the unit is fully written

Work units: items ``[u * unit_size, (u + 1) * unit_size)`` form unit ``u``. Its local rows live in a reserved,
chunk-aligned region ``[u * rows_per_unit, (u + 1) * rows_per_unit)`` with
``rows_per_unit = ceil(max_tokens * unit_size / rows_per_chunk) * rows_per_chunk``, so writers in different processes
never share a chunk (PLATFORM §7: shared chunks lose rows). A unit is written region-complete (its valid rows, then
zeros up to the end of the region) and ``done[u] = True`` is its last write, so a killed run resumes by redoing the
units that are not done and ends byte-identical to an uninterrupted run. No compaction pass: chunks that are all
zeros (the unused tail of each region) are never stored by zarr (``write_empty_chunks=False``), so the waste is at
most one partly used chunk per unit on disk; ``load_to_memory`` compacts the rows in RAM.

Completion: root ``complete`` is False at creation and set True as the last write of ``finalize``, followed by
metadata consolidation. Readers refuse stores that are not complete (the shared contract of ``setemb.store``).
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

FEATURE_FORMAT = "setemb.features/1"
MODALITIES = ("image", "text")


# ------------------------------------------------------------------------------------------------ feature writer
class ModalityWriter:
    """Writes the work units of one ``<split>/<modality>`` group. Picklable (holds only the path): ship it to Ray
    tasks, each writing distinct units.

    Args:
        path: store root.
        split: ``train`` / ``val`` / ``test``.
        modality: ``image`` or ``text``.
    """

    def __init__(self, path: str | Path, split: str, modality: str) -> None:
        self.path, self.split, self.modality = str(path), split, modality
        self._group: zarr.Group | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None}

    @property
    def group(self) -> zarr.Group:
        if self._group is None:
            root = zarr.open_group(self.path, mode="r+", use_consolidated=False)
            self._group = root[f"{self.split}/{self.modality}"]
        return self._group

    @property
    def attrs(self) -> dict[str, Any]:
        return self.group.attrs.asdict()

    @property
    def num_units(self) -> int:
        return int(self.group.attrs["num_units"])

    def unit_items(self, unit: int) -> tuple[int, int]:
        """Item range ``[lo, hi)`` of ``unit``."""
        size, n = int(self.group.attrs["unit_size"]), int(self.group.attrs["count"])
        if not 0 <= unit < self.num_units:
            raise ValueError(f"unit {unit} out of range [0, {self.num_units})")
        return unit * size, min(n, (unit + 1) * size)

    def remaining_units(self) -> list[int]:
        """Units not yet marked done (all of them for a fresh store, none after a finished run)."""
        done = self.group["done"][:]
        return [int(u) for u in np.flatnonzero(~done)]

    def write_unit(
        self,
        unit: int,
        local: Sequence[Any] | np.ndarray | torch.Tensor,
        global_: np.ndarray | torch.Tensor | None,
        ids: Sequence[Any],
        *,
        lengths: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        caption_to_image: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Write all items of ``unit``; ``done[unit] = True`` is the last write.

        Args:
            unit: work-unit index; its items are ``unit_items(unit)`` (b of them).
            local: per-item arrays ``[n_i, D]`` (``[n_i]`` for token ids), or a padded ``[b, T, D]`` (``[b, T]``)
                array together with ``lengths [b]``.
            global_: ``[b, Dg]``, or None when the group was created with ``global_dim=None``.
            ids: b item ids (converted to ``str``).
            lengths: valid rows per item when ``local`` is padded.
            caption_to_image: ``[b]`` image row of each caption (text groups only, required there).
        """
        attrs = self.group.attrs
        lo, hi = self.unit_items(unit)
        b, max_tokens, local_dim = hi - lo, int(attrs["max_tokens"]), attrs["local_dim"]
        items = _split_items(local, lengths)
        if len(items) != b or len(ids) != b:
            raise ValueError(f"unit {unit} holds {b} items, got {len(items)} local and {len(ids)} ids")
        item_shape = () if local_dim is None else (local_dim,)
        counts = np.array([len(x) for x in items], dtype=np.int32)
        for x in items:
            if x.shape[1:] != item_shape or len(x) > max_tokens:
                raise ValueError(f"local items must be [n <= {max_tokens}, *{item_shape}], got {tuple(x.shape)}")
        rows_per_unit = int(attrs["rows_per_unit"])
        region = np.zeros((rows_per_unit, *item_shape), dtype=np.dtype(attrs["local_dtype"]))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        for x, o in zip(items, offsets[:-1], strict=True):
            region[o : o + len(x)] = x
        row_lo = unit * rows_per_unit
        g = self.group
        g["local"][row_lo : row_lo + rows_per_unit] = region
        g["starts"][lo:hi] = row_lo + offsets[:-1]
        g["lengths"][lo:hi] = counts
        if attrs["global_dim"] is not None:
            if global_ is None:
                raise ValueError(f"{self.split}/{self.modality} stores global features; got global_=None")
            gl = as_numpy(global_)
            if gl.shape != (b, attrs["global_dim"]):
                raise ValueError(f"global_ must be [{b}, {attrs['global_dim']}], got {tuple(gl.shape)}")
            g["global"][lo:hi] = gl.astype(attrs["global_dtype"])
        g["ids"][lo:hi] = as_strings(ids)
        if self.modality == "text":
            if caption_to_image is None:
                raise ValueError("text units need caption_to_image")
            c2i = as_numpy(caption_to_image).astype(np.int64)
            if c2i.shape != (b,):
                raise ValueError(f"caption_to_image must be [{b}], got {tuple(c2i.shape)}")
            g["caption_to_image"][lo:hi] = c2i
        g["done"][unit] = True

    def finalize(self) -> None:
        """Mark this group complete; ValueError if units are missing."""
        missing = self.remaining_units()
        if missing:
            raise ValueError(f"{self.split}/{self.modality}: {len(missing)} units not written (first: {missing[:5]})")
        self.group.attrs["complete"] = True


def _split_items(local: Any, lengths: Any) -> list[np.ndarray]:
    if lengths is None:  # a sequence of [n_i, ...] items, or [b, n, ...] where every item has n rows
        return [as_numpy(x) for x in local]
    arr, lens = as_numpy(local), as_numpy(lengths).astype(np.int64)
    if arr.ndim < 2 or lens.shape != (arr.shape[0],) or (lens > arr.shape[1]).any() or (lens < 0).any():
        raise ValueError(f"padded local [b, T, ...] needs lengths [b] in [0, T]; got {arr.shape} and {lens.shape}")
    return [arr[i, : lens[i]] for i in range(arr.shape[0])]


class FeatureStoreWriter:
    """Creates (or resumes) a feature store; hands out one ``ModalityWriter`` per ``<split>/<modality>``.

    Args:
        path: store root directory.
        overwrite: start from an empty store even if ``path`` exists.
        attrs: extra root attrs (dataset, backbones, params hash, ...).
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, attrs: dict[str, Any] | None = None) -> None:
        self.path = str(path)
        self.root = open_for_writing(path, FEATURE_FORMAT, overwrite, attrs)

    def require_modality(
        self,
        split: str,
        modality: str,
        *,
        n: int,
        backbone: str,
        local_dim: int | None,
        global_dim: int | None,
        max_tokens: int,
        local_dtype: str = "float16",
        global_dtype: str = "float16",
        grid: Sequence[int] | None = None,
        unit_size: int = 256,
        rows_per_chunk: int = 256,
        attrs: dict[str, Any] | None = None,
    ) -> ModalityWriter:
        """Create ``<split>/<modality>`` or reopen it for resuming (the layout must match).

        Args:
            n: number of items.
            backbone: backbone name (stored in attrs).
            local_dim: width D of local rows; None stores 1-D rows (token ids, int ``local_dtype``).
            global_dim: width Dg of global features; None when the backbone has none (glove).
            max_tokens: upper bound of rows per item (49 / 36 for grids and regions, tokeniser max_length for text).
            local_dtype / global_dtype: storage dtypes (float16 by default; int32 for token ids).
            grid: ``(h, w)`` when local rows are a conv grid.
            unit_size: items per work unit.
            rows_per_chunk: chunk length along local rows.
            attrs: extra group attrs not part of the layout (e.g. ``vocab_size`` for token ids).
        """
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if min(n, max_tokens, unit_size, rows_per_chunk) < 1:
            raise ValueError(f"n, max_tokens, unit_size, rows_per_chunk must be >= 1, got {n, max_tokens, unit_size}")
        num_units = math.ceil(n / unit_size)
        rows_per_unit = math.ceil(max_tokens * unit_size / rows_per_chunk) * rows_per_chunk
        layout = {
            "backbone": backbone,
            "local_dim": local_dim,
            "global_dim": global_dim,
            "local_dtype": str(np.dtype(local_dtype)),
            "global_dtype": str(np.dtype(global_dtype)),
            "grid": list(grid) if grid is not None else None,
            "count": n,
            "unit_size": unit_size,
            "max_tokens": max_tokens,
            "rows_per_chunk": rows_per_chunk,
            "rows_per_unit": rows_per_unit,
            "num_units": num_units,
        }
        name = f"{split}/{modality}"
        if name in self.root:
            check_layout(self.root[name], layout, f"{self.path}/{name}")
            return ModalityWriter(self.path, split, modality)
        mark_incomplete(self.root)
        g = self.root.require_group(split).create_group(modality)
        local_shape = (num_units * rows_per_unit,) + (() if local_dim is None else (local_dim,))
        local_chunks = (rows_per_chunk,) + (() if local_dim is None else (local_dim,))
        zstd = ZstdCodec(level=3)
        g.create_array(
            "local", shape=local_shape, chunks=local_chunks, dtype=local_dtype, compressors=zstd, fill_value=0
        )
        g.create_array("starts", shape=(n,), chunks=(unit_size,), dtype="int64", fill_value=0)
        g.create_array("lengths", shape=(n,), chunks=(unit_size,), dtype="int32", fill_value=0)
        if global_dim is not None:
            g.create_array(
                "global", shape=(n, global_dim), chunks=(unit_size, global_dim), dtype=global_dtype, compressors=zstd
            )
        g.create_array("ids", shape=(n,), chunks=(unit_size,), dtype=str)
        if modality == "text":
            g.create_array("caption_to_image", shape=(n,), chunks=(unit_size,), dtype="int64", fill_value=-1)
        g.create_array("done", shape=(num_units,), chunks=(1,), dtype=bool, fill_value=False)
        g.attrs.update({**(attrs or {}), **layout, "complete": False})
        return ModalityWriter(self.path, split, modality)

    def modality(self, split: str, modality: str) -> ModalityWriter:
        """Writer of an existing group (in another process, e.g. a Ray task)."""
        if f"{split}/{modality}" not in self.root:
            raise KeyError(f"{self.path} has no {split}/{modality}; create it with require_modality")
        return ModalityWriter(self.path, split, modality)

    def remaining_units(self) -> dict[str, list[int]]:
        """``{"<split>/<modality>": units not done}`` over every group created so far."""
        out = {}
        for split, sg in self.root.groups():
            for modality, _ in sg.groups():
                out[f"{split}/{modality}"] = ModalityWriter(self.path, split, modality).remaining_units()
        return out

    def finalize(self) -> None:
        """Check every unit of every group is done, set ``complete=True`` (last write), consolidate metadata."""
        for name in self.remaining_units():
            split, modality = name.split("/")
            ModalityWriter(self.path, split, modality).finalize()
        mark_complete(self.root, self.path)


# ------------------------------------------------------------------------------------------------ feature reader
class ModalityFeatures:
    """One ``<split>/<modality>`` of a finished store, lazily read from Zarr or fully in memory.

    Attributes:
        attrs: group attrs (backbone, local_dim, global_dim, grid, count, ...).
        starts, lengths: ``[n]`` ragged index into the local rows.
    """

    def __init__(self, group: zarr.Group) -> None:
        self._group: zarr.Group | None = group
        self.attrs: dict[str, Any] = group.attrs.asdict()
        self._arrays: dict[str, Any] = {"local": group["local"], "starts": group["starts"][:]}
        self._arrays["lengths"] = group["lengths"][:].astype(np.int64)
        self.starts: np.ndarray = self._arrays["starts"]
        self.lengths: np.ndarray = self._arrays["lengths"]

    def _lazy(self, key: str) -> Any:
        if key not in self._arrays:
            if self._group is None or key not in self._group:
                return None
            value = self._group[key][:]
            self._arrays[key] = value.tolist() if key == "ids" else value
        return self._arrays[key]

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def in_memory(self) -> bool:
        return self._group is None

    @property
    def ids(self) -> list[str]:
        return self._lazy("ids")

    @property
    def global_features(self) -> np.ndarray | None:
        """``[n, Dg]`` in the storage dtype, or None (glove)."""
        return self._lazy("global")

    @property
    def global_rows(self) -> np.ndarray | zarr.Array | None:
        """``[n, Dg]`` global features without reading them: the lazy zarr array (in memory after
        ``load_to_memory``), or None (glove)."""
        if "global" in self._arrays:
            return self._arrays["global"]
        return self._group["global"] if self._group is not None and "global" in self._group else None

    @property
    def caption_to_image(self) -> np.ndarray | None:
        """``[n]`` int64 image row of each caption (text), None for images."""
        return self._lazy("caption_to_image")

    @property
    def local_rows(self) -> np.ndarray | zarr.Array:
        """All local rows ``[R, D]`` (``[R]`` token ids) in the storage dtype, indexed by ``starts``/``lengths``:
        a numpy array after `load_to_memory` (compacted), else the lazy zarr array (with unused unit tails)."""
        return self._arrays["local"]

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        local = self._arrays["local"]
        if isinstance(local, np.ndarray):
            return local[rows]
        return local.oindex[rows] if len(rows) else np.zeros((0, *local.shape[1:]), dtype=local.dtype)

    def local(self, i: int) -> torch.Tensor:
        """Local rows of item ``i``: ``[n_i, D]`` float32 (``[n_i]`` int64 for token ids)."""
        s, n = int(self.starts[i]), int(self.lengths[i])
        return _as_tensor(self._arrays["local"][s : s + n])

    def batch(self, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Padded batch of items.

        Args:
            indices: B item indices.

        Returns:
            local ``[B, N, D]`` float32 (``[B, N]`` int64 token ids, padded with 0) with N = max(1, max length),
            global ``[B, Dg]`` float32 or None, mask ``[B, N]`` bool (True = valid).
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        lens = self.lengths[idx].astype(np.int64)
        B, N = len(idx), max(1, int(lens.max(initial=0)))
        pos = np.arange(N)
        mask = pos[None, :] < lens[:, None]  # [B, N]
        rows = (self.starts[idx][:, None] + pos[None, :])[mask]  # [sum(lens)]
        values = self._rows(rows)
        padded = np.zeros((B, N, *values.shape[1:]), dtype=values.dtype)
        padded[mask] = values
        glob_t = None
        if "global" in self._arrays:  # in memory (or already read whole)
            glob_t = torch.from_numpy(self._arrays["global"][idx].astype(np.float32))
        elif self._group is not None and "global" in self._group:
            glob_t = torch.from_numpy(self._group["global"].oindex[idx, :].astype(np.float32))
        return _as_tensor(padded), glob_t, torch.from_numpy(mask)

    def load_to_memory(self) -> ModalityFeatures:
        """Read every array into RAM (local rows compacted: the unused tail of each unit region is dropped)."""
        if self.in_memory:
            return self
        local, rows_per_unit, size = (
            self._group["local"],
            int(self.attrs["rows_per_unit"]),
            int(self.attrs["unit_size"]),
        )
        parts, starts = [], np.zeros(len(self), dtype=np.int64)
        offset = 0
        for u in range(int(self.attrs["num_units"])):
            lo, hi = u * size, min(len(self), (u + 1) * size)
            row_lo = u * rows_per_unit
            used = int((self.starts[lo:hi] + self.lengths[lo:hi]).max(initial=row_lo)) - row_lo
            parts.append(local[row_lo : row_lo + used])
            starts[lo:hi] = self.starts[lo:hi] - row_lo + offset
            offset += used
        arrays = {"local": np.concatenate(parts), "starts": starts, "lengths": self.lengths.copy()}
        for key in ("global", "ids", "caption_to_image"):
            value = self._lazy(key)
            if value is not None:
                arrays[key] = value
        out = object.__new__(ModalityFeatures)
        out._group, out.attrs, out._arrays = None, dict(self.attrs), arrays
        out.starts, out.lengths = arrays["starts"], arrays["lengths"]
        return out


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    if np.issubdtype(x.dtype, np.integer):
        return torch.from_numpy(x.astype(np.int64))
    return torch.from_numpy(x.astype(np.float32))


@dataclass
class SplitFeatures:
    """The image and text features of one split."""

    image: ModalityFeatures
    text: ModalityFeatures

    @property
    def caption_to_image(self) -> np.ndarray:
        """``[n_captions]`` int64 row of each caption's image in ``image``."""
        return self.text.caption_to_image

    def load_to_memory(self) -> SplitFeatures:
        return SplitFeatures(self.image.load_to_memory(), self.text.load_to_memory())


class FeatureStore(StoreView):
    """Read-only view of a finished feature store; ``FeatureStore.open(path)["train"].image.batch([0, 1])``."""

    _KIND, _FORMAT = "feature", FEATURE_FORMAT

    @property
    def splits(self) -> list[str]:
        return sorted(name for name, _ in self.root.groups())

    def modality(self, split: str, modality: str) -> ModalityFeatures:
        name = f"{split}/{modality}"
        if name not in self.root:
            raise KeyError(f"feature store {self.path} has no {name}; has splits {self.splits}")
        return ModalityFeatures(self.root[name])

    def split(self, name: str) -> SplitFeatures:
        return SplitFeatures(self.modality(name, "image"), self.modality(name, "text"))

    __getitem__ = split
