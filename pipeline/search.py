"""Search the set indexes built by `pipeline.indexing`: a caption finds images, an image file finds captions.

The query is encoded by `pipeline.query.QueryEncoder` (the same frozen backbone and trained tower as the indexed
sets) and ranked by the index with the similarity the model was trained with. The index records the digest of the
model it was built from; searching it with another model is refused (the sets would not be comparable).

``SearchResult.to_json()``: ``{"query", "direction", "split", "similarity", "results": [{"rank", "id",
"path" | "caption", "image"?, "score"}]}``; `print_table` prints rank, id, image path or caption, score, best first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.params import Params

logger = logging.getLogger("setemb.stage.search")

TEXT_TO_IMAGE, IMAGE_TO_TEXT = "text_to_image", "image_to_text"


@dataclass
class SearchResult:
    """A ranked answer. ``results``: ``{"rank", "id", "score"}`` plus ``"path"`` (images) or ``"caption"`` and
    ``"image"`` (captions), best first."""

    query: str
    direction: str
    split: str
    similarity: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "direction": self.direction,
            "split": self.split,
            "similarity": self.similarity,
            "results": self.results,
        }


def open_index(index_dir: Path, modality: str) -> tuple[dict[str, Any], Path]:
    """``(manifest, sub-index dir)`` of the ``modality`` database; StageError with the `dvc repro index` hint."""
    from pipeline.indexing import INDEX_FORMAT, MANIFEST_JSON

    manifest_path = index_dir / MANIFEST_JSON
    if not manifest_path.is_file():
        raise StageError(f"no search index at {index_dir}; run `dvc repro index` (or pass --index)")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != INDEX_FORMAT:
        raise StageError(f"{index_dir} is not a setemb search index (format {manifest.get('format')!r})")
    if modality not in manifest.get("indexes", {}):
        need = "text queries" if modality == "image" else "image queries"
        raise StageError(
            f"{index_dir} has no {modality} index ({need} need it; has {sorted(manifest['indexes'])}); "
            f"run `dvc repro index` without --modality"
        )
    return manifest, index_dir / modality


def run_search(
    params: Params,
    *,
    query: str | None = None,
    image: str | os.PathLike | None = None,
    k: int | None = None,
    index: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    encoder: Any = None,
) -> SearchResult:
    """Rank the indexed images for a caption (``query``) or the indexed captions for an image file (``image``).

    Args:
        params: validated params (``extract`` picks the backbones, ``index.top_k`` the default k, ``paths`` the
            default index and model).
        query: caption text (text -> images). image: image file (image -> captions). Exactly one of them.
        k: results (default ``index.top_k``).
        index: index directory (default ``paths.index``). model: exported model (default ``paths.model``).
        encoder: a ready `QueryEncoder` for ``model`` (reused across calls); built when None.

    Returns:
        `SearchResult`, at most k rows (fewer when the database is smaller).

    Raises:
        ValueError: empty / ambiguous query or k < 1 (usage, exit 2 in the CLI). StageError: missing index, an
        index built from another model, or a compressed index whose embedding store is missing or changed.
        FileNotFoundError: no model. BadImageError: unreadable image.
    """
    import numpy as np

    from pipeline.indexing import ITEMS_JSON, load_database_index
    from pipeline.query import QueryEncoder, model_digest

    check_query(query, image)
    k = params.index.top_k if k is None else k
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index_dir = Path(index if index is not None else params.paths.index)
    model_dir = Path(model if model is not None else params.paths.model)
    database = "image" if image is None else "text"
    manifest, sub = open_index(index_dir, database)
    digest = model_digest(model_dir)  # FileNotFoundError (exit 1) for a missing model
    if digest != manifest["model"]["digest"]:
        raise StageError(
            f"the index at {index_dir} was built from another model than {model_dir}; run `dvc repro index` or pass "
            f"the --model it was built from ({manifest['model']['path']})"
        )
    set_index = load_database_index(sub)  # a compressed one: StageError when its embedding store is gone / changed
    encoder = encoder or QueryEncoder(model_dir, params)
    sets = encoder.encode_text([query]) if image is None else encoder.encode_images([image])  # [1, L, D]
    scores, rows = set_index.search(sets, k=k)  # [1, k], [1, k]
    items = json.loads((index_dir / ITEMS_JSON).read_text())
    table = items["images"] if database == "image" else items["captions"]
    results = []
    for score, row in zip(scores[0].tolist(), rows[0].tolist(), strict=True):
        if row < 0 or not np.isfinite(score):
            continue  # padding: fewer than k items
        item = table[row]
        entry: dict[str, Any] = {"rank": len(results) + 1, "id": item["id"]}
        if database == "image":
            entry["path"] = item.get("path")
        else:
            entry.update(caption=item.get("text"), image=item.get("image"))
        entry["score"] = float(score)
        results.append(entry)
    return SearchResult(
        query=str(query if image is None else image),
        direction=TEXT_TO_IMAGE if image is None else IMAGE_TO_TEXT,
        split=manifest["split"],
        similarity=manifest["similarity"],
        results=results,
    )


def check_query(query: str | None, image: str | os.PathLike | None) -> None:
    """ValueError unless exactly one of a non-blank caption and an image path is given."""
    if query is not None and image is not None:
        raise ValueError("give either a caption or --image, not both")
    if image is None and (query is None or not query.strip()):
        raise ValueError('empty query: pass a caption ("a red circle left of a blue square") or --image PATH')
    if image is not None and not str(image).strip():
        raise ValueError("empty --image path")


def print_table(result: SearchResult) -> None:
    """The ranked results as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    images = result.direction == TEXT_TO_IMAGE
    table = Table(title=f"{result.direction.replace('_', ' ')} | {result.split} | {result.similarity.get('name')}")
    table.add_column("rank", justify="right")
    table.add_column("id", overflow="fold")
    table.add_column("path" if images else "caption", overflow="fold")
    table.add_column("score", justify="right")
    for row in result.results:
        shown = row.get("path") if images else row.get("caption")
        table.add_row(str(row["rank"]), str(row["id"]), "-" if shown is None else str(shown), f"{row['score']:.4f}")
    Console(soft_wrap=False).print(table)
