"""Atomic file and directory replacement: outputs are either the old version or the new one, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

# Side files kept inside a feature store directory (written by the extract stage, read by training and search).
REJECTED_JSON = "rejected.json"  # on_bad_image=skip: every rejected item with its reason
VOCAB_JSON = "vocab.json"  # glove text backbone: vocabulary of the train captions
GLOVE_VECTORS = "glove_vectors.npy"  # glove text backbone: [V, 300] initial word vectors, when a GloVe file is given


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> Path:
    """Write ``value`` as JSON to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dumps_kwargs.setdefault("indent", 1)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, **dumps_kwargs)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished directory ``src`` to ``dst``, replacing what was there.

    The previous ``dst`` is renamed aside first and removed last, so a crash leaves either it or the new one.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst
