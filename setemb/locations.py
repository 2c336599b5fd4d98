"""Where stores live: a local path or an fsspec URL (``s3://bucket/features.zarr``, ``gs://...``).

A Ray cluster without a shared filesystem reads the feature store and writes its checkpoints through a URL that
every node can reach. Zarr opens URLs through fsspec itself; this module answers the few questions zarr does not
(does it exist, join, delete) the same way for both kinds. fsspec is imported only for URLs, so local use needs
nothing beyond zarr. Credentials and endpoints come from fsspec's usual sources (for S3: ``AWS_*`` variables,
including ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (``file://`` included), False for plain paths."""
    return "://" in str(location)


def resolve(location: str | os.PathLike) -> str:
    """An absolute path for local locations (Ray workers may run elsewhere), URLs unchanged."""
    return str(location) if is_url(location) else str(Path(location).resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for paths and URLs alike."""
    if is_url(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location).joinpath(*parts))


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def exists(location: str | os.PathLike) -> bool:
    """Whether anything (a file, a directory, a prefix with objects under it) is at ``location``."""
    if not is_url(location):
        return Path(location).exists()
    fs, path = _filesystem(str(location))
    return bool(fs.exists(path))


def glob(location: str | os.PathLike, pattern: str) -> list[str]:
    """Names (not full paths) of the entries directly under ``location`` that match ``pattern``."""
    if not is_url(location):
        return sorted(p.name for p in Path(location).glob(pattern))
    fs, path = _filesystem(str(location))
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(f"{path.rstrip('/')}/{pattern}"))


def remove_tree(location: str | os.PathLike) -> None:
    """Delete ``location`` and everything under it (nothing happens when it is absent)."""
    if not exists(location):
        return
    if not is_url(location):
        import shutil

        shutil.rmtree(location)
        return
    fs, path = _filesystem(str(location))
    fs.rm(path, recursive=True)
