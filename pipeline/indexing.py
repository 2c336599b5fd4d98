"""Build the searchable set indexes (``setemb.index.SetIndex``) over one split of the embedding store.

Output (``paths.index``), written to a hidden temp dir beside it and renamed into place (never half-written)::

    manifest.json   format, split, similarity {"name", "kwargs"} (as trained), model {"digest", "epoch"},
                    embeddings path, and per database modality: items, set_size, embed_dim, kind (compressed
                    kinds also: store, the re-ranking array relative to the sub-index; resident_bytes)
    items.json      what search prints, in embedding-store row order (= index item id):
                    images [{"id", "path"}], captions [{"id", "text", "image"}] ("image" = the caption's image id)
    image/          the index over ``<split>/image`` sets: the database of text -> image search
    text/           the index over ``<split>/text`` sets: the database of image -> caption search

Index item ids are row numbers of the embedding set; ``items.json`` turns them into dataset ids, image paths and
caption texts (read from the Karpathy JSON; when it is absent only the ids are known). ``index.kind: auto`` picks
flat or IVF by size (``setemb.index.default_index_params``); ``nlist`` / ``nprobe`` override the IVF defaults.

Kinds ``flat`` / ``ivf`` / ``hnsw`` write a ``setemb.index.SetIndex`` (FAISS float32 element copies + its own
re-ranking vectors). Kinds ``ivf_sq8`` / ``ivf_pq`` write a ``setemb.index.compressed.CompressedSetIndex``: element
codes only (``index.faiss`` + ``config.json``); it re-ranks from ``<embeddings>/<split>/<modality>`` of the embedding
store itself, recorded as a path relative to the sub-index directory plus a signature of the array, so the store
must stay where `stages.embed` wrote it; `load_database_index` refuses a missing or changed store in one line.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.files import replace_dir, write_json_atomic
from pipeline.params import Params

logger = logging.getLogger("setemb.stage.index")

INDEX_FORMAT = "setemb.search_index/1"
MANIFEST_JSON, ITEMS_JSON = "manifest.json", "items.json"
MODALITIES = ("image", "text")  # sub-index names = the modality the database holds
IVF_TRAIN_POINTS_PER_LIST = 40  # FAISS k-means warns below 39 training points per list
COMPRESSED = ("ivf_sq8", "ivf_pq")  # = setemb.index.compressed.COMPRESSED_KINDS (not imported here: it loads faiss)
STORE_FIX = "rebuild the index against the current store: `dvc repro index` (`dvc repro embed` first if it is gone)"


def index_modalities(params: Params) -> list[str]:
    """Database modalities to build (``index.modalities``)."""
    return list(params.index.modalities)


def index_kwargs(params: Params, num_items: int, num_elements: int) -> dict[str, Any]:
    """Index constructor kwargs for a database of ``num_items`` sets of ``num_elements``: ``SetIndex`` kwargs (kind /
    IVF / HNSW / storage) or, for ``ivf_sq8`` / ``ivf_pq``, ``CompressedSetIndex`` kwargs (IVF / PQ / re-rank depth /
    cache bound).

    ``kind: auto`` takes ``default_index_params``; ``nlist`` / ``nprobe`` from params win over the defaults. An
    explicit IVF kind without ``nlist`` uses ~sqrt(E) lists (E = elements), capped so each list has training points.
    """
    from setemb.index import default_index_params

    p = params.index
    total = max(1, num_items * num_elements)
    chosen = default_index_params(num_items, num_elements) if p.kind == "auto" else {"kind": p.kind}
    kind = chosen["kind"]
    kwargs: dict[str, Any] = {"kind": kind, "candidates_per_element": p.candidates_per_element, "seed": params.seed}
    if kind in COMPRESSED:
        kwargs.update(rerank=p.rerank_depth, cache_bytes=int(p.rerank_cache_mb * 2**20))
        if kind == "ivf_pq":
            kwargs.update(pq_m=p.pq_m, pq_bits=p.pq_bits)
    else:
        kwargs.update(hnsw_m=p.hnsw_m, ef_search=p.ef_search, storage_dtype=p.storage_dtype)
    if kind in ("ivf", *COMPRESSED):
        nlist = p.nlist or chosen.get("nlist") or 2 ** round(math.log2(math.sqrt(total)))
        nlist = max(1, min(int(nlist), total // IVF_TRAIN_POINTS_PER_LIST or 1))
        nprobe = p.nprobe or chosen.get("nprobe") or max(16, nlist // 32)
        kwargs.update(nlist=nlist, nprobe=min(int(nprobe), nlist))
        kwargs["train_size"] = min(total, max(100_000, IVF_TRAIN_POINTS_PER_LIST * nlist))
    return kwargs


def read_items(
    split: str,
    image_ids: list[str],
    caption_ids: list[str],
    caption_to_image: Any,
    *,
    dataset_json: Path | None,
    image_root: Path | None,
    captions_per_image: int,
) -> dict[str, Any]:
    """``items.json`` content: per embedding row, the image path / caption text from the Karpathy JSON.

    Rows whose id is not in the JSON (or all rows, without a JSON) get ``path`` / ``text`` null.
    """
    paths: dict[str, str] = {}
    texts: dict[str, str] = {}
    if dataset_json is not None and dataset_json.is_file():
        from setemb.data import read_karpathy

        index = read_karpathy(dataset_json, image_root or dataset_json.parent, split, captions_per_image)
        if index.image_paths is not None:
            paths = {i: str(p) for i, p in zip(index.image_ids, index.image_paths, strict=True)}
        texts = dict(zip(index.caption_ids, index.captions, strict=True))
    else:
        logger.warning("no dataset json (%s): search will print item ids only", dataset_json)
    missing = sum(i not in paths for i in image_ids) + sum(c not in texts for c in caption_ids)
    if missing and (paths or texts):
        logger.warning("%d embedded items are not in %s (their paths / captions stay empty)", missing, dataset_json)
    images = [{"id": i, "path": paths.get(i)} for i in image_ids]
    captions = [
        {"id": c, "text": texts.get(c), "image": image_ids[int(r)] if 0 <= int(r) < len(image_ids) else None}
        for c, r in zip(caption_ids, caption_to_image, strict=True)
    ]
    return {"split": split, "images": images, "captions": captions}


def _write_json(path: Path, value: Any) -> None:
    write_json_atomic(path, value, indent=1, ensure_ascii=False)


def _check_model(store_attrs: dict[str, Any], config: dict[str, Any], embeddings: Path, model: Path) -> None:
    """The embedding store must come from the model at ``model`` (same kwargs, similarity and epoch)."""
    for key, store_key in (("model", "model"), ("similarity", "similarity"), ("epoch", "model_epoch")):
        if config.get(key) != store_attrs.get(store_key):
            raise StageError(
                f"{embeddings} was embedded with another model than {model} ({key} differs); run `dvc repro embed`"
            )


def _compressed_preflight(kwargs: dict[str, Any], where: str, N: int, K: int, D: int) -> None:
    """StageError naming the index param when an ivf_pq database cannot be built (D, training elements)."""
    if kwargs["kind"] != "ivf_pq":
        return
    if D % kwargs["pq_m"]:
        raise StageError(f"index.pq_m={kwargs['pq_m']} does not divide the embedding width D={D} of {where}; "
                         f"choose a divisor of {D} for index.pq_m")  # fmt: skip
    need = 2 ** kwargs["pq_bits"]
    if min(kwargs["train_size"], N * K) < need:
        raise StageError(f"index.pq_bits={kwargs['pq_bits']} trains {need} centroids per sub-quantizer, but {where} "
                         f"has only {N * K} elements ({N} sets x {K}); lower index.pq_bits or use index.kind "
                         "ivf_sq8 / flat")  # fmt: skip


def store_reference(embeddings: Path, name: str, sub_index: Path) -> str:
    """Path of the embedding set ``name`` of the store at ``embeddings``, relative to the sub-index directory that
    re-ranks from it (so the index and the store can move together, e.g. another checkout of the repository)."""
    return os.path.relpath(embeddings.resolve() / name, sub_index.resolve())


def load_database_index(sub_index: str | os.PathLike, *, cache_bytes: int | None = None) -> Any:
    """The index saved in ``sub_index`` (``<paths.index>/<modality>``): a ``SetIndex`` or, by its ``config.json``
    format, a ``CompressedSetIndex`` attached to its embedding store (``cache_bytes`` overrides its cache bound).

    Raises:
        StageError: the compressed index's embedding store is missing or changed (one line, with the fix).
    """
    from setemb.index import SetIndex

    sub_index = Path(sub_index)
    if not is_compressed(sub_index):
        return SetIndex.load(sub_index)
    from setemb.index.compressed import CompressedSetIndex, RerankStoreError

    try:
        return CompressedSetIndex.load(sub_index, cache_bytes=cache_bytes)
    except RerankStoreError as e:
        raise StageError(f"{e}; {STORE_FIX}") from None


def check_database_store(sub_index: str | os.PathLike) -> None:
    """For a compressed index: its embedding store exists and matches (StageError as `load_database_index`), without
    loading the codes; nothing to check for the other kinds (they hold their own vectors)."""
    sub_index = Path(sub_index)
    if not is_compressed(sub_index):
        return
    from setemb.index.compressed import CompressedSetIndex, RerankStoreError

    try:
        CompressedSetIndex.open_store(sub_index)
    except RerankStoreError as e:
        raise StageError(f"{e}; {STORE_FIX}") from None


def is_compressed(sub_index: Path) -> bool:
    """Whether ``sub_index`` holds a ``CompressedSetIndex`` (by the format in its ``config.json``)."""
    import json

    from setemb.index.compressed import COMPRESSED_FORMAT

    config = sub_index / "config.json"
    if not config.is_file():
        raise StageError(f"no index at {sub_index} (no config.json); run `dvc repro index`")
    return json.loads(config.read_text()).get("format") == COMPRESSED_FORMAT


def run_index(
    params: Params,
    *,
    embeddings: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    dataset_json: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    modalities: list[str] | None = None,
) -> dict[str, Any]:
    """Index ``<index.split>/<modality>`` of ``embeddings`` for every database modality; write ``out`` atomically.

    Args:
        params: validated params (``index`` and ``seed`` are read).
        embeddings: embedding store (``paths.embeddings``).
        model: exported model directory (``paths.model``): its digest is recorded, search checks it.
        out: index directory to write (``paths.index``).
        dataset_json: Karpathy JSON (``paths.dataset_json``) for image paths and caption texts; None = ids only.
        image_root: image folder (``paths.image_root``).
        modalities: database modalities to build (default ``index_modalities(params)``: image and text).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        FileNotFoundError: no embedding store / model. StageError: incomplete store, split not embedded, store made
        by another model.
    """
    from pipeline.query import model_digest, read_model_config
    from setemb.embedding_store import EmbeddingStore
    from setemb.index import SetIndex
    from setemb.index.compressed import CompressedSetIndex
    from setemb.store import IncompleteStoreError

    embeddings, model, out = Path(embeddings), Path(model), Path(out)
    split = params.index.split
    modalities = list(modalities or index_modalities(params))
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {modalities}")
    try:
        store = EmbeddingStore.open(embeddings)
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    missing = [f"{split}/{m}" for m in MODALITIES if f"{split}/{m}" not in store.names]
    if missing:
        raise StageError(
            f"embedding store {embeddings} has no {missing} (has {store.names}); add {split!r} to embed.splits and "
            "run `dvc repro embed`, or set index.split"
        )
    config = read_model_config(model)
    _check_model(store.attrs, config, embeddings, model)
    similarity = store.attrs["similarity"]
    image_group, text_group = store.root[f"{split}/image"], store.root[f"{split}/text"]
    items = read_items(
        split,
        image_group["ids"][:].tolist(),
        text_group["ids"][:].tolist(),
        text_group["caption_to_image"][:],
        dataset_json=None if dataset_json is None else Path(dataset_json),
        image_root=None if image_root is None else Path(image_root),
        captions_per_image=int(store.attrs.get("captions_per_image") or config.get("captions_per_image") or 5),
    )
    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "split": split,
        "similarity": similarity,
        "model": {"path": str(model), "digest": model_digest(model), "epoch": config.get("epoch")},
        "embeddings": str(embeddings),
        "indexes": {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for modality in modalities:
            array = store.root[f"{split}/{modality}"]["embeddings"]
            N, K, D = array.shape
            kwargs = index_kwargs(params, N, K)
            logger.info("indexing %s/%s: %d sets x %d x %d, %s", split, modality, N, K, D, kwargs)
            entry = {"items": N, "set_size": K, "embed_dim": D, "kind": kwargs["kind"]}
            sim = {"similarity": similarity["name"], "similarity_kwargs": similarity.get("kwargs") or {}}
            if kwargs["kind"] in COMPRESSED:
                _compressed_preflight(kwargs, f"{embeddings}/{split}/{modality}", N, K, D)
                compressed = CompressedSetIndex(D, K, **sim, **kwargs)
                compressed.add_from_store(array)
                reference = store_reference(embeddings, f"{split}/{modality}", out / modality)
                compressed.save(staging / modality, store=reference)  # staging is out's sibling: same relative path
                entry.update(store=reference, resident_bytes=compressed.memory_bytes())
            else:
                index = SetIndex(D, K, **sim, **kwargs)
                index.add_from_store(array)
                index.save(staging / modality)
            manifest["indexes"][modality] = entry
        _write_json(staging / ITEMS_JSON, items)
        _write_json(staging / MANIFEST_JSON, manifest)
        replace_dir(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
