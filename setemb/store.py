"""What the Zarr stores share (zarr 3.x, format v3; PLATFORM §7): format tag, completion marker, read-only base.

Two stores build on this module: ``setemb.feature_store`` (the frozen backbones' features, written by the extract
stage) and ``setemb.embedding_store`` (the trained model's embedding sets, written by the embed stage). Both follow
the same contract:

* The root attrs hold ``format`` (``setemb.features/1`` or ``setemb.embeddings/1``) and ``complete``.
* A writer creates the store with ``complete = False`` (``open_for_writing``), or reopens it to resume an
  interrupted run; adding a group clears the marker again (``mark_incomplete``), and reopening a group checks that
  its layout is unchanged (``check_layout``).
* ``finalize`` sets ``complete = True`` as its last write, then consolidates the metadata (``mark_complete``).
* Readers (``StoreView.open``) refuse a missing store (FileNotFoundError), another format (ValueError) and a store
  whose ``complete`` is not True (``IncompleteStoreError``), each with one line naming the stage to re-run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from setemb.locations import exists

_CONSOLIDATED_WARNING = "Consolidated metadata is currently not part"


class IncompleteStoreError(RuntimeError):
    """A store exists but its ``complete`` marker is not set (the run that wrote it was interrupted)."""


@contextmanager
def _quiet_consolidated():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_WARNING)
        yield


def _hint(kind: str) -> str:
    stage = "extract" if kind == "feature" else "embed"
    return f"`dvc repro {stage}` / the {stage} stage"


def open_complete(path: str | Path, kind: str, fmt: str) -> zarr.Group:
    """Open a finished store read-only; FileNotFoundError / IncompleteStoreError with a one-line hint otherwise."""
    if not exists(path):
        raise FileNotFoundError(f"{kind} store {path} does not exist; run {_hint(kind)} to create it")
    with _quiet_consolidated():
        group = zarr.open_group(str(path), mode="r")
    if group.attrs.get("format") != fmt:
        raise ValueError(
            f"{path} is not a setemb {kind} store (format {group.attrs.get('format')!r}, expected {fmt!r})"
        )
    if group.attrs.get("complete") is not True:
        raise IncompleteStoreError(
            f"{kind} store {path} is incomplete (interrupted run?); re-run {_hint(kind)} to resume"
        )
    return group


def open_for_writing(path: str | Path, fmt: str, overwrite: bool, attrs: dict[str, Any] | None) -> zarr.Group:
    """Create a store of format ``fmt`` (``complete=False``), or reopen an existing one for resuming."""
    if overwrite or not exists(path):
        group = zarr.open_group(str(path), mode="w")
        group.attrs.update({**(attrs or {}), "format": fmt, "complete": False})
        return group
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    if group.attrs.get("format") != fmt:
        raise ValueError(f"{path} exists and is not a {fmt} store; delete it or pass overwrite=True")
    if attrs:
        group.attrs.update(attrs)
    return group


def mark_incomplete(group: zarr.Group) -> None:
    """Clear the root ``complete`` marker before a writer adds a group to a store."""
    # Re-writing the root attrs with use_consolidated=False also drops stale consolidated metadata.
    if group.attrs.get("complete") is not False:
        group.attrs["complete"] = False


def mark_complete(group: zarr.Group, path: str | Path) -> None:
    """Set the root ``complete`` marker (the last write), then consolidate the metadata."""
    group.attrs["complete"] = True  # the last write
    with _quiet_consolidated():
        zarr.consolidate_metadata(str(path))


def as_numpy(x: Any) -> np.ndarray:
    """A numpy array from a tensor (detached, on CPU; bfloat16 widened to float32) or an array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def as_strings(ids: Sequence[Any]) -> np.ndarray:
    """Item ids as a variable-length numpy string array (what zarr v3 stores as UTF-8 strings)."""
    # StringDType, not "<U": fixed-width numpy strings drop trailing NUL characters.
    return np.array([str(i) for i in ids], dtype=np.dtypes.StringDType())


def check_layout(group: zarr.Group, expected: dict[str, Any], where: str) -> None:
    """ValueError unless the layout attrs of an existing ``group`` equal ``expected`` (resuming needs the same)."""
    found = {k: group.attrs.get(k) for k in expected}
    if found != expected:
        raise ValueError(
            f"{where} exists with a different layout ({found} != {expected}); delete it or pass overwrite=True"
        )


class StoreView:
    """Read-only view of a finished store: ``root`` group and its ``attrs``; subclasses set ``_KIND`` and
    ``_FORMAT``."""

    _KIND, _FORMAT = "", ""

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path, self.root = str(path), group
        self.attrs: dict[str, Any] = group.attrs.asdict()

    @classmethod
    def open(cls, path: str | Path) -> Any:
        """FileNotFoundError if missing, IncompleteStoreError if the writing run did not finish."""
        return cls(path, open_complete(path, cls._KIND, cls._FORMAT))
