"""``SetIndex`` on disk: one directory, rebuilt by ``SetIndex.load`` without re-adding anything.

Layout::

    <directory>/
      config.json    {"format": "setemb.index/1", "size": G, "config": SetIndex kwargs (build + search)}
      index.faiss    the FAISS element index (``faiss.write_index``)
      item_ids.npy   [G] int64 external id of each position
      vectors.npy    [G, K, D] re-ranking vectors in the storage dtype, written in blocks (memory-mapped on load)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

if TYPE_CHECKING:
    from setemb.index import SetIndex

FORMAT = "setemb.index/1"


def save_index(index: SetIndex, directory: str | Path, block_size: int = 65536) -> None:
    """Write ``index.faiss``, ``config.json``, ``item_ids.npy`` and ``vectors.npy`` (streamed in blocks)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index.faiss_index, str(out / "index.faiss"))
    np.save(out / "item_ids.npy", index.item_ids)
    K, D = index.config["num_elements"], index.config["dim"]
    dtype = index.vectors.dtype
    vectors = np.lib.format.open_memmap(out / "vectors.npy", mode="w+", dtype=dtype, shape=(len(index), K, D))
    start = 0
    for block in index.vectors.blocks(block_size):
        vectors[start : start + len(block)] = block
        start += len(block)
    vectors.flush()
    del vectors
    search = dict(candidates_per_element=index.candidates_per_element, nprobe=index.nprobe,
                  ef_search=index.ef_search, query_block_size=index.query_block_size)  # fmt: skip
    meta = {"format": FORMAT, "size": len(index), "config": {**index.config, **search}}
    (out / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_index(cls: type[SetIndex], directory: str | Path, *, mmap: bool = True) -> SetIndex:
    """Rebuild an index written by ``save_index``; ``mmap`` keeps ``vectors.npy`` on disk (memory-mapped, read-only)."""
    src = Path(directory)
    meta = json.loads((src / "config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}: expected format {FORMAT!r}, got {meta.get('format')!r}")
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
