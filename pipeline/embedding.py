"""Embed the feature store's splits with the trained model into an embedding store (sets, ids, attention maps).

Output (``paths.embeddings``, ``setemb.embedding_store`` format): per split in ``embed.splits`` the sets
``<split>/image`` ``[N, K, D]`` and ``<split>/text`` ``[C, L, D]`` float32 with ``ids``, ``caption_to_image`` (text:
row of the caption's image in ``<split>/image``) and, when ``embed.save_attention`` is on and the head returns them,
``attention [N, K, Ntok]`` (zero beyond each item's length). Root attrs: ``similarity`` ``{"name", "kwargs"}`` as
trained (what evaluation scores with), ``model`` (the ``create_model`` kwargs), ``model_epoch``,
``captions_per_image``, ``limit`` and ``fingerprint``.

Resumable: items are written in work units and the store is marked complete last, so readers never see a partial
store and a rerun after a crash redoes only the missing units. The ``fingerprint`` (model files, embed params,
limit, feature store attrs) decides whether an existing store is resumed / kept (same) or rewritten (different).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import StageError, progress_enabled
from pipeline.files import file_sha256
from pipeline.params import Params

logger = logging.getLogger("setemb.stage.embed")

UNIT_ITEMS = 1024  # items per resumable work unit of an embedding set


def embed_fingerprint(params: Params, model_dir: Path, store: Any, limit: int | None) -> str:
    """Hash of what determines the embedding store: model weights and config, embed params, limit, feature attrs."""
    from pipeline.checkpoints import CONFIG_FILE, LOSS_FILE, MODEL_FILE

    groups = {
        f"{split}/{modality}": store.modality(split, modality).attrs
        for split in params.embed.splits
        if split in store.splits
        for modality in ("image", "text")
    }
    payload = {
        "model": {f: file_sha256(model_dir / f) for f in (MODEL_FILE, LOSS_FILE, CONFIG_FILE)},
        "embed": params.embed.model_dump(mode="json"),
        "limit": limit,
        "features": {"root": store.attrs, "groups": groups},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _existing(path: Path) -> tuple[str | None, bool]:
    """(fingerprint, complete) of an existing embedding store at ``path``; (None, False) when there is none."""
    import zarr

    from setemb.embedding_store import EMBEDDING_FORMAT

    if not path.exists():
        return None, False
    if not (path / "zarr.json").is_file():
        raise StageError(f"{path} exists and is not an embedding store; delete it or choose another --out")
    attrs = zarr.open_group(str(path), mode="r", use_consolidated=False).attrs.asdict()
    if attrs.get("format") != EMBEDDING_FORMAT:
        raise StageError(f"{path} exists and is not an embedding store; delete it or choose another --out")
    return attrs.get("fingerprint"), attrs.get("complete") is True


def _encode_rows(tower, features, rows, device, n_tokens: int | None):
    """Embeddings ``[b, K, D]`` float32 (CPU) and attention ``[b, K, n_tokens]`` (or None) of feature ``rows``."""
    import torch

    local, global_, mask = features.batch(rows)  # [b, N, D_in] (or [b, N] ids), [b, Dg] | None, [b, N]
    out = tower(local.to(device), None if global_ is None else global_.to(device), mask.to(device))
    embeddings = out.embeddings.float().cpu()  # [b, K, D]
    attention = None
    if n_tokens is not None and out.attention is not None:
        att = out.attention.float().cpu()  # [b, K, N]
        if att.shape[-1] > n_tokens:
            raise ValueError(f"attention over {att.shape[-1]} inputs, expected at most {n_tokens}")
        attention = torch.nn.functional.pad(att, (0, n_tokens - att.shape[-1]))  # [b, K, n_tokens]
    return embeddings, attention


def _embed_set(writer, name: str, tower, features, rows, *, c2i, batch_size: int, save_attention: bool, device,
               quiet: bool, attrs: dict[str, Any]) -> dict[str, int]:  # fmt: skip
    """Create (or resume) the set ``name`` for feature ``rows`` and write its missing units in batches."""
    import numpy as np
    from tqdm import tqdm

    n_tokens = max(1, int(features.lengths[rows].max(initial=0)))
    probe, probe_att = _encode_rows(tower, features, rows[:1], device, n_tokens if save_attention else None)
    _, K, D = probe.shape
    ids = features.ids
    set_writer = writer.require_set(
        name,
        ids=[ids[r] for r in rows],
        num_embeddings=K,
        embed_dim=D,
        caption_to_image=c2i,
        attention_tokens=n_tokens if probe_att is not None else None,
        unit_size=UNIT_ITEMS,
        attrs=attrs,
    )
    units = set_writer.remaining_units()
    todo = sum(hi - lo for lo, hi in map(set_writer.unit_items, units))
    bar = tqdm(total=todo, desc=f"Embed {name}", file=sys.stderr, disable=not progress_enabled(quiet), leave=False)
    try:
        for unit in units:
            lo, hi = set_writer.unit_items(unit)
            parts, att_parts = [], []
            for b0 in range(lo, hi, batch_size):
                emb, att = _encode_rows(
                    tower,
                    features,
                    rows[b0 : min(hi, b0 + batch_size)],
                    device,
                    n_tokens if probe_att is not None else None,
                )
                parts.append(emb)
                att_parts.append(att)
                bar.update(len(emb))
            attention = None if probe_att is None else np.concatenate([a.numpy() for a in att_parts])
            set_writer.write_unit(unit, np.concatenate([p.numpy() for p in parts]), attention)
    finally:
        bar.close()
    return {"items": len(rows), "set_size": int(K), "embed_dim": int(D)}


def _summary(path: Path) -> dict[str, Any]:
    """``{split: {modality: {"items", "set_size", "embed_dim"}}}`` of a finished embedding store."""
    import zarr

    root = zarr.open_group(str(path), mode="r", use_consolidated=False)
    summary: dict[str, Any] = {}
    for split, group in root.groups():
        for modality in ("image", "text"):
            if modality in group:
                N, K, D = group[modality]["embeddings"].shape
                summary.setdefault(split, {})[modality] = {"items": N, "set_size": K, "embed_dim": D}
    return summary


def run_embed(
    params: Params,
    *,
    features: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    limit: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Encode ``params.embed.splits`` of ``features`` with the model at ``model``; write the embedding store ``out``.

    Args:
        params: validated params (``embed`` is read).
        features: feature store (``paths.features``).
        model: exported model directory (``paths.model``).
        out: embedding store to write (``paths.embeddings``).
        limit: embed only the first ``limit`` images of each split and their captions (smoke runs).
        quiet: no progress bar.

    Returns:
        ``{split: {"image": {"items", "set_size", "embed_dim"}, "text": {...}}}``.

    Raises:
        FileNotFoundError: no feature store / model. StageError: incomplete store, split not extracted, ``out`` is
        something else.
    """
    import numpy as np
    import torch

    from pipeline.checkpoints import load_model
    from setemb.embedding_store import EmbeddingStoreWriter
    from setemb.feature_store import FeatureStore
    from setemb.store import IncompleteStoreError

    model_dir, out = Path(model), Path(out)
    try:
        store = FeatureStore.open(features)
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    missing = [s for s in params.embed.splits if s not in store.splits]
    if missing:
        raise StageError(
            f"feature store {features} has no split(s) {missing} (has {store.splits}); add them to extract.splits "
            "and run `dvc repro extract`, or remove them from embed.splits"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net, _, config = load_model(model_dir, device)
    fingerprint = embed_fingerprint(params, model_dir, store, limit)
    found, complete = _existing(out)
    if found == fingerprint and complete:
        logger.info("%s is up to date (fingerprint %s); nothing to do", out, fingerprint[:12])
        return _summary(out)
    overwrite = found is not None and found != fingerprint
    if overwrite:
        logger.info("%s was made from other inputs; rewriting it", out)
    elif found is not None and not complete:
        logger.info("resuming the interrupted embedding store %s", out)
    similarity = config.get("similarity")
    if similarity is None:
        raise StageError(f"{model_dir}/config.json records no similarity; re-export the model with the train stage")
    writer = EmbeddingStoreWriter(
        out,
        overwrite=overwrite,
        attrs={
            "fingerprint": fingerprint,
            "similarity": similarity,
            "model": config.get("model"),
            "model_epoch": config.get("epoch"),
            "captions_per_image": config.get("captions_per_image"),
            "limit": limit,
            "features": str(features),
        },
    )
    towers = {"image": net.encode_image, "text": net.encode_text}
    summary: dict[str, Any] = {}
    with torch.inference_mode():
        for split in params.embed.splits:
            split_features = store[split]
            c2i_all = np.asarray(split_features.caption_to_image, dtype=np.int64)
            n_images = len(split_features.image) if limit is None else min(limit, len(split_features.image))
            image_rows = np.arange(n_images, dtype=np.int64)
            caption_rows = np.flatnonzero(c2i_all < n_images)
            if n_images == 0 or len(caption_rows) == 0:
                raise StageError(f"split {split} of {features} has no images or no captions to embed")
            summary[split] = {}
            for modality, rows, c2i in (("image", image_rows, None), ("text", caption_rows, c2i_all[caption_rows])):
                summary[split][modality] = _embed_set(
                    writer,
                    f"{split}/{modality}",
                    towers[modality],
                    getattr(split_features, modality),
                    rows,
                    c2i=c2i,
                    batch_size=params.embed.batch_size,
                    save_attention=params.embed.save_attention,
                    device=device,
                    quiet=quiet,
                    attrs={"split": split, "modality": modality},
                )
    writer.finalize()
    return summary
