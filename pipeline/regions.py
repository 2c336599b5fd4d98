"""Adapters for BUTD region features stored outside the SCAN precomp layout (DATA_FORMATS §5).

One format is supported: an HDF5 file with one dataset ``(n, N, D)`` (N = 36 boxes, D = 2048 for BUTD) plus an id per
row, given either as a dataset in the same file or as a JSON side file. The adapter returns ``(row_ids, regions)``;
``setemb.data.align_region_rows(index, row_ids)`` then points each image of a `SplitIndex` at its row, and
``regions[index.region_rows[i]]`` is image i's ``float32 [N, D]``.

Example:
    >>> ids, regions = read_region_hdf5("butd.h5", dataset="features", ids="ids")
    >>> index = align_region_rows(read_karpathy("dataset_coco.json", "images", "test"), ids)
    >>> regions[index.region_rows[:4]].shape   # (4, 36, 2048)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)


class HDF5Regions:
    """Read-only, picklable array-like over an HDF5 dataset ``[n, N, D]``.

    The file is opened lazily (so the object can be sent to Ray tasks) and stays open until `close`.
    Indexing takes an int, a slice or an integer array in any order (h5py itself needs increasing unique indices).
    """

    def __init__(self, path: str | Path, dataset: str) -> None:
        self.path = Path(path)
        self.dataset = dataset
        self._file: Any = None
        self._data: Any = None
        with h5py.File(self.path, "r") as f:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ValueError(f"{self.path}: no dataset {dataset!r}; datasets: {_dataset_names(f)}")
            self.shape: tuple[int, ...] = tuple(f[dataset].shape)
            self.dtype = f[dataset].dtype
        if len(self.shape) != 3:
            raise ValueError(f"{self.path}:{dataset}: expected a 3-D array (n, N, D), got shape {self.shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _dataset(self) -> Any:
        if self._data is None:
            self._file = h5py.File(self.path, "r")
            self._data = self._file[self.dataset]
        return self._data

    def __getitem__(self, key: Any) -> np.ndarray:
        data = self._dataset()
        if isinstance(key, (int, np.integer, slice)):
            return np.asarray(data[key])
        rows = np.asarray(key, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"expected an int, a slice or a 1-D row array, got shape {rows.shape}")
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        unique, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(data[unique])[inverse]  # [len(rows), N, D]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._data = None

    def __enter__(self) -> HDF5Regions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dataset": self.dataset, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _file=None, _data=None)


def _dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value)


def _ids_from_json(path: Path, n_rows: int) -> list[str]:
    """JSON side file: a list of ids in row order, or an object ``{id: row}`` covering rows 0..n-1 once each."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        ids = [_as_str(v) for v in data]
    elif isinstance(data, dict):
        ids_by_row: list[str | None] = [None] * n_rows
        for key, row in data.items():
            if not isinstance(row, int) or not 0 <= row < n_rows or ids_by_row[row] is not None:
                raise ValueError(f"{path}: id {key!r} maps to row {row!r}, expected a distinct row in 0..{n_rows - 1}")
            ids_by_row[row] = str(key)
        unset = [r for r, v in enumerate(ids_by_row) if v is None]
        if unset:
            raise ValueError(f"{path}: {len(unset)} rows have no id (first: {unset[:5]})")
        ids = [str(v) for v in ids_by_row]
    else:
        raise ValueError(f"{path}: expected a list of ids or an object {{id: row}}")
    return ids


def read_region_hdf5(
    path: str | Path, dataset: str = "features", ids: str | Path = "ids"
) -> tuple[list[str], HDF5Regions]:
    """Open BUTD region features stored in HDF5 (DATA_FORMATS §5).

    Args:
        path: the HDF5 file.
        dataset: name of the ``(n, N, D)`` feature dataset in it.
        ids: where the row ids come from: a `Path` or a string ending in ".json" is a JSON side file (a list of ids in
            row order, or ``{id: row}``); any other string names a 1-D dataset of the HDF5 file (ints or strings).

    Returns:
        ``(row_ids, regions)``: ``row_ids[r]`` is the image id (string) of row r; pass it to
        ``setemb.data.align_region_rows``.

    Raises:
        FileNotFoundError: the HDF5 or JSON file is missing.
        ValueError: the datasets are missing or ill-shaped, or the ids are not one per row and unique.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 region file not found: {path}")
    regions = HDF5Regions(path, dataset)
    n_rows = len(regions)
    if isinstance(ids, Path) or str(ids).endswith(".json"):
        ids_path = Path(ids)
        if not ids_path.is_file():
            raise FileNotFoundError(f"id side file not found: {ids_path}")
        row_ids = _ids_from_json(ids_path, n_rows)
    else:
        with h5py.File(path, "r") as f:
            if ids not in f or not isinstance(f[ids], h5py.Dataset):
                raise ValueError(f"{path}: no id dataset {ids!r}; datasets: {_dataset_names(f)}")
            raw = f[ids][()]
        if np.ndim(raw) != 1:
            raise ValueError(f"{path}:{ids}: expected a 1-D id dataset, got shape {np.shape(raw)}")
        row_ids = [_as_str(v) for v in raw]
    if len(row_ids) != n_rows:
        raise ValueError(f"{path}: {len(row_ids)} ids for {n_rows} feature rows")
    if len(set(row_ids)) != n_rows:
        raise ValueError(f"{path}: row ids are not unique")
    logger.info("%s: %d region rows of shape %s", path, n_rows, regions.shape[1:])
    return row_ids, regions
