"""The serving core, free of Ray and FastAPI: index shards, the exact top-k merge, element matches, the item catalog
and checks of untrusted input (text, uploads, embedding sets).

Sharding. A database of G sets is cut into ``S`` contiguous row ranges (`shard_bounds`); shard ``s`` is a
``setemb.index.SetIndex`` over rows ``[lo, hi)`` whose item ids are the global rows. Every shard answers its own
exact top-k (FAISS candidates, then exact set re-ranking, `ShardSearcher.search`), and `merge_topk` takes the top-k of
the union ordered by ``(-score, row)``: the unsharded index's tie rule (the earlier-added row first), so with
exhaustive candidates the merged list *equals* the unsharded one. With a flat element index the candidates of a shard
are a superset of the unsharded candidates that fall in it (a global top-C hit is a top-C hit of its own shard), so the
merged result is never worse than the unsharded one and equals it whenever that one is exact.

Compressed shards (``ivf_sq8`` / ``ivf_pq``, `setemb.index.compressed.CompressedSetIndex.shard`): each shard holds the
unsharded index's own codes for its rows (same trained quantizers, copied, not re-encoded) and re-ranks from the same
embedding store, so every score stays exact; each shard re-ranks its own ``rerank`` best items by the proxy score
(S shards re-rank S x ``rerank`` items in all), and with exhaustive candidates and re-ranking the merged list equals the
unsharded one. Each shard holds its own re-ranking cache of the bound the index was built with (or ``cache_mb``).

Matches. Each hit carries, for every query element ``l``, the result element ``k`` it matches best and their cosine
(``argmax_k cos(q_l, g_k)``) plus the best pair overall: what a client needs to explain a hit and what the search page
uses to pick the attention map to show.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.indexing import INDEX_FORMAT, ITEMS_JSON, MANIFEST_JSON

MAX_TEXT_CHARS = 1000
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # 40 Mpx: far above any photo a query needs, far below a decompression bomb
MAX_K = 100
DATABASES = ("image", "text")  # the database a query searches: image = text -> images, text = image -> captions


class ServeError(ValueError):
    """Bad client input: ``status`` is the HTTP status to answer with, ``str(self)`` the one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- input checks
def check_text(text: Any, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A caption query: a non-blank string of at most ``max_chars`` characters (ServeError 422 / 413 otherwise)."""
    if not isinstance(text, str) or not text.strip():
        raise ServeError(422, 'text must be a non-empty caption, e.g. {"text": "a red circle", "k": 10}')
    if len(text) > max_chars:
        raise ServeError(413, f"text is {len(text)} characters long; at most {max_chars} are accepted")
    return text.strip()


def check_k(k: Any, max_k: int = MAX_K) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise ServeError(422, f"k must be an integer in 1..{max_k}, got {k!r}")
    return k


def check_sets(sets: Any, dim: int, max_elements: int = 64) -> np.ndarray:
    """One query set ``[L, D]`` (a list of L vectors of width ``dim``) -> float32 ``[1, L, D]``; ServeError 422."""
    try:
        array = np.asarray(sets, dtype=np.float32)
    except (TypeError, ValueError):
        raise ServeError(422, f"embeddings must be a list of L vectors of {dim} numbers") from None
    if array.ndim != 2 or array.shape[1] != dim or not 1 <= array.shape[0] <= max_elements:
        raise ServeError(
            422, f"embeddings must be [L, {dim}] with 1 <= L <= {max_elements}, got shape {list(array.shape)}"
        )
    if not np.isfinite(array).all() or (np.linalg.norm(array, axis=1) == 0).any():
        raise ServeError(422, "embeddings must be finite and non-zero")
    return array[None]  # [1, L, D]


def decode_upload(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Decode an uploaded image fully into RGB; ServeError for empty, non-image, truncated or oversized images.

    The pixel count is checked from the header *before* decoding, so a decompression bomb (a few kB of PNG that
    inflates to gigabytes) is refused without allocating it.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ServeError(422, "the upload is empty; send an image file (JPEG, PNG, ...) as form field 'image'")
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            if w * h > max_pixels:
                raise ServeError(413, f"image is {w}x{h} pixels; at most {max_pixels} pixels are accepted")
            image.load()
            return image.convert("RGB")
    except ServeError:
        raise
    except UnidentifiedImageError:
        raise ServeError(415, "the upload is not an image PIL can read (JPEG, PNG, GIF, WebP, ...)") from None
    except Image.DecompressionBombError as e:
        raise ServeError(413, f"image refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ServeError(422, f"the image could not be decoded ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------- shards
def shard_bounds(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """``num_shards`` contiguous ``[lo, hi)`` row ranges covering ``range(num_items)``, sizes differing by <= 1."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards > max(1, num_items):
        raise ValueError(f"cannot cut {num_items} items into {num_shards} non-empty shards")
    edges = [round(i * num_items / num_shards) for i in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def element_matches(query: np.ndarray, result: np.ndarray) -> dict[str, Any]:
    """Which result element each query element matches: ``query [L, D]``, ``result [K, D]`` (any norms).

    Returns:
        ``{"matches": [{"query_element", "result_element", "cosine"}] (one per l), "best": {...}}``.
    """
    q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
    g = result / np.maximum(np.linalg.norm(result, axis=1, keepdims=True), 1e-12)
    cos = q.astype(np.float32) @ g.astype(np.float32).T  # [L, K]
    best_k = cos.argmax(1)  # [L]
    matches = [{"query_element": int(q_el), "result_element": int(k), "cosine": float(cos[q_el, k])}
               for q_el, k in enumerate(best_k)]  # fmt: skip
    return {"matches": matches, "best": max(matches, key=lambda m: m["cosine"])}


class ShardSearcher:
    """Shard ``shard`` of ``num_shards`` of the ``database`` index written by ``stages.index`` under ``index_dir``.

    One shard is the saved index itself (memory-mapped vectors, or a compressed index's codes). Several shards of a
    ``SetIndex`` each build a ``SetIndex`` of the same kind and parameters over their row range of the saved float
    vectors (IVF lists capped at 1 per 40 elements of the shard, as ``stages.index`` does); several shards of a
    compressed index each keep the saved codes of their rows (`CompressedSetIndex.shard`).

    Args:
        cache_mb: re-ranking cache bound of a compressed index, per shard, in MiB (None: as the index was built).
    """

    def __init__(self, index_dir: str | Path, database: str, shard: int = 0, num_shards: int = 1,
                 cache_mb: float | None = None) -> None:  # fmt: skip
        from pipeline.indexing import load_database_index
        from setemb.index import SetIndex

        cache_bytes = None if cache_mb is None else int(cache_mb * 2**20)
        full = load_database_index(Path(index_dir) / database, cache_bytes=cache_bytes)
        n = len(full)
        self.lo, self.hi = shard_bounds(n, num_shards)[shard]
        self.database, self.shard, self.num_shards = database, shard, num_shards
        self.compressed = not isinstance(full, SetIndex)
        if self.compressed:
            self.index = full if num_shards == 1 else full.shard(self.lo, self.hi)
        elif num_shards == 1:
            if not np.array_equal(full.item_ids, np.arange(n)):
                raise ValueError(f"{index_dir}/{database}: item ids are not the rows 0..{n - 1}")
            self.index = full
        else:
            config = dict(full.config)
            elements = (self.hi - self.lo) * config["num_elements"]
            config["nlist"] = max(1, min(config["nlist"], elements // 40))
            search = dict(candidates_per_element=full.candidates_per_element, nprobe=min(full.nprobe, config["nlist"]),
                          ef_search=full.ef_search, query_block_size=full.query_block_size)  # fmt: skip
            self.index = SetIndex(**config, **search)
            for lo in range(self.lo, self.hi, 65536):
                hi = min(lo + 65536, self.hi)
                self.index.add(full.vectors.gather(np.arange(lo, hi)), ids=np.arange(lo, hi))
        self.dim = int(self.index.config["dim"])

    def info(self) -> dict[str, Any]:
        info = {"database": self.database, "shard": self.shard, "rows": [self.lo, self.hi],
                "kind": self.index.config["kind"]}  # fmt: skip
        if self.compressed:
            info["resident_bytes"] = self.index.memory_bytes()
        return info

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """``[len(rows), K, D]`` float32 stored sets of global ``rows`` (all inside this shard)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.compressed:
            return self.index.sets(rows)  # global rows, read from the embedding store through the cache
        order = np.argsort(rows)
        out = np.empty((len(rows), self.index.config["num_elements"], self.dim), np.float32)
        if len(rows):
            out[order] = self.index.vectors.gather(rows[order] - self.lo)
        return out

    def search(self, sets: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-k of this shard for each query set ``sets [Q, L, D]``: per query ``[{"row", "score", "matches",
        "best"}]`` best first (fewer than k when the shard is small)."""
        scores, ids = self.index.search(sets, k=k)  # [Q, k], [Q, k]
        out = []
        for q in range(len(sets)):
            found = [(float(s), int(i)) for s, i in zip(scores[q].tolist(), ids[q].tolist(), strict=True)
                     if i >= 0 and math.isfinite(s)]  # fmt: skip
            vectors = self.vectors([i for _, i in found])
            out.append([{"row": i, "score": s, **element_matches(sets[q], vectors[j])}
                        for j, (s, i) in enumerate(found)])  # fmt: skip
        return out


def merge_topk(shard_hits: Sequence[Sequence[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """Exact top-k of the union of per-shard top-k lists, ordered by ``(-score, row)`` (module docstring)."""
    merged = [hit for hits in shard_hits for hit in hits]
    merged.sort(key=lambda h: (-h["score"], h["row"]))
    return merged[:k]


# ---------------------------------------------------------------------------------------------- catalog
class Catalog:
    """What the index manifest and ``items.json`` say about each row, plus stored attention maps of the images.

    Args:
        index_dir: the ``stages.index`` output (``manifest.json``, ``items.json``).
        features: feature store, for the conv ``grid`` and backbone input size of the attention maps (optional: a
            square grid is inferred from the number of attention tokens when absent).
    """

    def __init__(self, index_dir: str | Path, features: str | Path | None = None) -> None:
        index_dir = Path(index_dir)
        if not (index_dir / MANIFEST_JSON).is_file():
            raise FileNotFoundError(f"no search index at {index_dir}; run `dvc repro index` (or pass --index)")
        self.manifest = json.loads((index_dir / MANIFEST_JSON).read_text())
        if self.manifest.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_dir} is not a setemb search index (format {self.manifest.get('format')!r})")
        items = json.loads((index_dir / ITEMS_JSON).read_text())
        self.images: list[dict[str, Any]] = items["images"]
        self.captions: list[dict[str, Any]] = items["captions"]
        self.databases = sorted(self.manifest["indexes"])
        self.split = self.manifest["split"]
        self._attention, self.grid, self.input_size, self.image_transform = None, None, 224, "center_crop"
        self._open_attention(features)

    def _open_attention(self, features: str | Path | None) -> None:
        import zarr

        path = Path(self.manifest.get("embeddings", ""))
        try:
            group = zarr.open_group(str(path), mode="r")[f"{self.split}/image"]
        except (FileNotFoundError, KeyError, ValueError):
            return
        if "attention" not in group:
            return
        self._attention = group["attention"]  # [N, K, Ntok]
        tokens = self._attention.shape[2]
        if features is not None and Path(features).exists():
            from setemb.feature_store import FeatureStore

            try:
                attrs = FeatureStore.open(features).modality(self.split, "image").attrs
                self.grid = tuple(attrs["grid"]) if attrs.get("grid") else None
                self.input_size = int(attrs.get("image_size") or 224)
                self.image_transform = attrs.get("image_transform") or "center_crop"  # unrecorded: before the param
            except (FileNotFoundError, KeyError, ValueError, RuntimeError):
                pass
        if self.grid is None and math.isqrt(tokens) ** 2 == tokens:
            self.grid = (math.isqrt(tokens), math.isqrt(tokens))

    @property
    def has_attention(self) -> bool:
        return self._attention is not None and self.grid is not None

    def size(self, database: str) -> int:
        return len(self.images if database == "image" else self.captions)

    def item(self, database: str, row: int) -> dict[str, Any]:
        """Metadata of ``row``: images ``{"row", "id", "path", "file"}``, captions ``{"row", "id", "caption",
        "image"}``; ServeError 404 for an unknown database or row."""
        if database not in self.databases:
            raise ServeError(404, f"no {database!r} database; this server has {self.databases}")
        table = self.images if database == "image" else self.captions
        if not 0 <= row < len(table):
            raise ServeError(404, f"no {database} row {row}; rows are 0..{len(table) - 1}")
        entry = table[row]
        if database == "image":
            out = {"row": row, "id": entry["id"], "path": entry.get("path"), "file": f"/items/image/{row}/file"}
            if self.has_attention:
                K = self._attention.shape[1]
                out["attention"] = [f"/items/image/{row}/attention/{k}.png" for k in range(K)]
            return out
        return {"row": row, "id": entry["id"], "caption": entry.get("text"), "image": entry.get("image")}

    def image_file(self, row: int) -> Path:
        """The image file of image row ``row``; ServeError 404 when the index knows no path or it is gone."""
        path = self.item("image", row).get("path")
        if not path or not Path(path).is_file():
            raise ServeError(404, f"image row {row} has no image file on this server")
        return Path(path)

    def attention_png(self, row: int, element: int, side: int = 224) -> bytes:
        """PNG of stored image ``row`` with set element ``element``'s attention overlaid (as ``stages.report``)."""
        from PIL import Image

        if not self.has_attention:
            raise ServeError(404, "this index has no attention maps (embed.save_attention off, or no conv grid)")
        path = self.image_file(row)
        K = self._attention.shape[1]
        if not 0 <= element < K:
            raise ServeError(404, f"no set element {element}; image sets have elements 0..{K - 1}")
        heat = np.asarray(self._attention[row, element])  # [Ntok]
        with Image.open(path) as image:
            return attention_png(image.convert("RGB"), heat, self.grid, self.input_size, side, self.image_transform)


def attention_png(image: Any, heat: np.ndarray, grid: Sequence[int], input_size: int = 224, side: int = 224,
                  transform: str = "center_crop", colormap: str = "jet", alpha: float = 0.6) -> bytes:  # fmt: skip
    """``heat [Ntok]`` (row-major over ``grid`` = (h, w), padding beyond) blended over ``image`` (PIL RGB) fitted to
    ``side`` pixels, with `pipeline.report.overlay_attention` (the report's Figure-4 panels); PNG bytes. ``transform``
    is the backbone's test-time transform (`pipeline.report.backbone_crop_box`)."""
    import torch
    from PIL import Image

    from pipeline.report import attention_grid, backbone_crop_box, overlay_attention

    scale = side / max(image.size)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)  # fmt: skip
    box = [v * shown.width / image.width for v in backbone_crop_box(image.width, image.height, input_size, transform)]
    maps = attention_grid(torch.as_tensor(np.asarray(heat, dtype=np.float32))[None], grid)  # [1, h, w]
    pixels = overlay_attention(np.asarray(shown), maps[0].numpy(), box, colormap, alpha)  # [H, W, 3] uint8
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


__all__ = [
    "Catalog",
    "ServeError",
    "ShardSearcher",
    "attention_png",
    "check_k",
    "check_sets",
    "check_text",
    "decode_upload",
    "element_matches",
    "merge_topk",
    "shard_bounds",
]
