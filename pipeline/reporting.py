"""run_report: the report folder people look at, drawn with `pipeline.report`: attention-map figures (DivE Figure 4)
and a static, offline HTML retrieval gallery.

Output (``--out``, e.g. ``reports/``)::

    gallery.html        text -> image and image -> text top-k lists (one ``.tile`` per result), then the figures
    images/*.jpg        gallery thumbnails (relative paths: the folder is self-contained and works offline)
    attention/*.png     one figure per image: the image, then each set element's attention over the conv grid,
                        titled with the caption nearest to that element (``pipeline.report.nearest_captions``)

Queries are spread evenly over the split (``pipeline.report.spread``): ``report.num_text_queries`` captions,
``report.num_image_queries`` and ``report.num_images`` images. Ranking uses the similarity the model was trained
with (the embedding store's ``similarity`` attr) unless ``report.similarity`` overrides it, in the evaluate stage's
orientation (images as the first argument of ``score``). Ground truth: gold = the original pair, green = relevant in
the exhaustive relevance file (when given). Figures need attention maps in the store (``embed.save_attention``) and
a conv grid in the feature store (``grid`` attr); otherwise they are skipped with a warning.

Params: the ``report`` group of params.yaml.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.params import Params

logger = logging.getLogger("setemb.stage.report")

GALLERY_HTML, IMAGES_DIR, ATTENTION_DIR = "gallery.html", "images", "attention"


def _similarity(report: Any, attrs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if report.similarity is not None:
        return report.similarity, dict(report.similarity_kwargs)
    trained = attrs.get("similarity")
    if not trained:
        logger.warning("the embedding store records no trained similarity; ranking with smooth_chamfer defaults")
        return "smooth_chamfer", dict(report.similarity_kwargs)
    return trained["name"], {**trained.get("kwargs", {}), **report.similarity_kwargs}


def _rows_of(ids: list[str], dataset_ids: list[str], what: str, dataset_json: Path) -> list[int]:
    """Row in the dataset split of each embedding-store id."""
    where = {item: i for i, item in enumerate(dataset_ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise StageError(
            f"{len(missing)} {what} ids of the embedding store are not in {dataset_json} (first: {missing[:3]}); "
            "are the embeddings from another dataset? re-run `dvc repro`"
        )
    return [where[i] for i in ids]


def run_report(
    params: Params,
    *,
    embeddings: str | os.PathLike,
    dataset_json: str | os.PathLike,
    image_root: str | os.PathLike,
    out: str | os.PathLike,
    features: str | os.PathLike | None = None,
    relevance: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``<out>/gallery.html``, its thumbnails and the attention figures of ``report.split``.

    Args:
        params: validated params (the ``report`` group).
        embeddings: embedding store (``paths.embeddings``).
        dataset_json, image_root: the Karpathy JSON and image folder (captions, image files).
        out: report folder; its ``gallery.html``, ``images/`` and ``attention/`` are replaced.
        features: feature store (``paths.features``): the conv ``grid`` and backbone input size; None skips figures.
        relevance: exhaustive relevance file (``pipeline.shapes`` format); None or "" marks only the original pairs.

    Returns:
        ``{"gallery": path, "figures": [paths], "tiles": n, "similarity": name}``.
    """
    import numpy as np
    import torch

    from pipeline.report import Hit, Query, render_gallery, spread, write_thumbnail
    from setemb.data import read_karpathy
    from setemb.embedding_store import EmbeddingStore
    from setemb.similarity import score
    from setemb.store import IncompleteStoreError

    rp = params.report
    out, dataset_json = Path(out), Path(dataset_json)
    try:
        store = EmbeddingStore.open(embeddings)
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    split = rp.split
    if f"{split}/image" not in store.names or f"{split}/text" not in store.names:
        raise StageError(
            f"embedding store {embeddings} has no {split} split (has {store.names}); run `dvc repro embed`"
        )
    image, text = store[f"{split}/image"], store[f"{split}/text"]
    n_images, n_captions = len(image.ids), len(text.ids)
    c2i = np.asarray(text.caption_to_image, dtype=np.int64)  # [C] row in `image`
    cpi = int(store.attrs.get("captions_per_image") or np.bincount(c2i, minlength=n_images).max())
    index = read_karpathy(dataset_json, image_root, split, captions_per_image=cpi)
    image_rows = _rows_of(list(image.ids), index.image_ids, "image", dataset_json)
    caption_rows = _rows_of(list(text.ids), index.caption_ids, "caption", dataset_json)
    captions = [index.captions[r] for r in caption_rows]
    paths = [index.image_paths[r] for r in image_rows] if index.image_paths is not None else None
    if paths is None:
        raise StageError(f"{dataset_json} gives no image files (precomputed regions?); the report needs images")
    rel = None
    if relevance is not None and str(relevance):
        from pipeline.shapes import load_relevance

        if not Path(relevance).is_file():
            raise FileNotFoundError(f'no relevance file at {relevance}; run `dvc repro prepare` or pass ""')
        full = load_relevance(relevance, split, index)  # [C_all, n_all] bool
        rel = full[np.ix_(caption_rows, image_rows)]  # [C, N] in store order
    name, kwargs = _similarity(rp, store.attrs)
    logger.info("%s: %d images, %d captions; similarity %s %s; relevance %s", split, n_images, n_captions, name,
                kwargs, "yes" if rel is not None else "no")  # fmt: skip

    for stale in (out / IMAGES_DIR, out / ATTENTION_DIR):
        shutil.rmtree(stale, ignore_errors=True)
    (out / GALLERY_HTML).unlink(missing_ok=True)
    thumbs = out / IMAGES_DIR

    def thumb(row: int) -> str:
        return write_thumbnail(paths[row], thumbs, f"{row:05d}_{image.ids[row]}", rp.thumbnail_px)

    def kind(caption: int, img: int) -> str:
        if c2i[caption] == img:
            return "original"
        return "relevant" if rel is not None and rel[caption, img] else "other"

    k = min(rp.top_k, n_images)
    text_queries, image_queries = [], []
    with torch.inference_mode():
        picked = spread(n_captions, rp.num_text_queries)
        if picked:
            s = score(image.embeddings, text.embeddings[picked], similarity=name, **kwargs).T  # [Q, N]
            values, order = s.topk(k, dim=1)  # [Q, k]
            for q, c in enumerate(picked):
                hits = [Hit(r + 1, float(values[q, r]), kind(c, int(i)), image.ids[int(i)], thumb(int(i)))
                        for r, i in enumerate(order[q])]  # fmt: skip
                total = None if rel is None else int(rel[c].sum())
                sub = f"caption {text.ids[c]} of image {image.ids[c2i[c]]}"
                text_queries.append(Query(f"\u201c{captions[c]}\u201d", sub, hits, relevant_total=total))
        kc = min(rp.top_k, n_captions)
        picked = spread(n_images, rp.num_image_queries)
        if picked:
            values, order = score(image.embeddings[picked], text.embeddings, similarity=name, topk=kc, **kwargs)
            for q, i in enumerate(picked):
                hits = [Hit(r + 1, float(values[q, r]), kind(int(c), i), captions[int(c)])
                        for r, c in enumerate(order[q])]  # fmt: skip
                total = None if rel is None else int(rel[:, i].sum())
                image_queries.append(Query(f"image {image.ids[i]}", "", hits, thumb(i), total))

        figures = _figures(rp, image, text, captions, c2i, paths, features, split, out / ATTENTION_DIR)
    epoch = store.attrs.get("model_epoch")
    meta = " \u00b7 ".join([f"split {split}", f"{n_images} images", f"{n_captions} captions",
                            f"similarity {name} {kwargs}", *([f"model epoch {epoch}"] if epoch is not None else []),
                            str(embeddings)])  # fmt: skip
    gallery = render_gallery(
        out / GALLERY_HTML,
        meta=meta,
        text_queries=text_queries,
        image_queries=image_queries,
        figures=[f"{ATTENTION_DIR}/{p.name}" for p in figures],
        has_relevance=rel is not None,
    )
    tiles = sum(len(q.hits) for q in [*text_queries, *image_queries])
    logger.info("wrote %s (%d tiles) and %d attention figures", gallery, tiles, len(figures))
    return {"gallery": gallery, "figures": figures, "tiles": tiles, "similarity": name}


def _figures(rp: Any, image: Any, text: Any, captions: list[str], c2i: Any, paths: list[Path],
             features: str | os.PathLike | None, split: str, out: Path) -> list[Path]:  # fmt: skip
    """Attention figures of ``rp.num_images`` images spread over the split; [] (with a warning) when impossible."""
    import numpy as np
    from PIL import Image

    from pipeline.report import (
        attention_grid,
        nearest_captions,
        panel_title,
        render_attention_figure,
        safe_name,
        spread,
    )  # fmt: skip
    from setemb.feature_store import FeatureStore

    if rp.num_images == 0:
        return []
    if image.attention is None:
        logger.warning("no attention maps in the embedding store (embed.save_attention off?); figures skipped")
        return []
    if features is None:
        logger.warning("no --features given: the grid layout is unknown; attention figures skipped")
        return []
    attrs = FeatureStore.open(features).modality(split, "image").attrs
    if not attrs.get("grid"):
        logger.warning("the image features have no conv grid (%s); attention figures skipped", attrs.get("backbone"))
        return []
    picked = spread(len(image.ids), rp.num_images)
    cos, nearest = nearest_captions(image.embeddings[picked], text.embeddings)  # [B, K]
    written = []
    for b, i in enumerate(picked):
        maps = attention_grid(image.attention[i], attrs["grid"])  # [K, h, w]
        titles = [panel_title(captions[int(nearest[b, e])], f"element {e} \u00b7 cos {float(cos[b, e]):.2f}")
                  for e in range(maps.shape[0])]  # fmt: skip
        own = int(np.flatnonzero(c2i == i)[0]) if (c2i == i).any() else None
        head = f"image {image.ids[i]}"
        with Image.open(paths[i]) as im:
            written.append(render_attention_figure(
                im.convert("RGB"), maps, input_size=int(attrs.get("image_size") or 224), titles=titles,
                transform=attrs.get("image_transform") or "center_crop",
                image_title=panel_title(captions[own], head) if own is not None else head,
                path=out / f"{b:02d}_{safe_name(image.ids[i])}.png", panel_px=rp.panel_px, colormap=rp.colormap,
                alpha=rp.alpha,
            ))  # fmt: skip
    return written
