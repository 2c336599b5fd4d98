"""Evaluate an embedding store: recall@K (M§6), R-Precision / mAP@R, circular variance; metrics.json and plots.

Scoring streams over image blocks of ``evaluate.block_size`` (``setemb.similarity.score`` tiles inside each block):
only one ``[block_size, n_captions]`` block of set scores exists at a time, so COCO 5K runs in bounded memory.

Protocols (M§6): ``full`` ranks every image against every caption of the split (COCO 5K, F30K 1K); ``five_fold_1k``
averages ``full`` over consecutive folds of 1,000 images (COCO 1K); ``auto`` runs both when the split has exactly
5 folds of images (COCO 5K test), else ``full``.

metrics.json (DVC metrics)::

    {"full": {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_...", "rsum",
              "i2t_r<k>", "t2i_r<k>" for every k in evaluate.recall_ks},
     "five_fold_1k": {... same keys, averaged over folds ...},              (when that protocol ran)
     "precision": {"t2i_r_precision", "t2i_map_at_r", "i2t_r_precision", "i2t_map_at_r"},   (with a relevance file)
     "circular_variance": {"image_log_mean", "image_mean", "text_log_mean", "text_mean"},
     "info": {"source": "our run", "protocol", "split", "similarity", "similarity_kwargs" (JSON text),
              "similarity_source", "image_elements", "text_elements", "n_images", "n_captions",
              "captions_per_image", "model_epoch", "embeddings"}}

``<plots>/recall_at_k.json``: rows ``{"k", "recall", "direction": "i2t" | "t2i"}`` of the ``full`` protocol (of
``five_fold_1k`` when only that one ran). Precision is always computed over the whole split: t2i queries captions
against images with the caption -> image relevance, i2t uses its transpose. Circular variance is of the full sets,
whatever element subset is evaluated.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.files import write_json_atomic
from pipeline.params import EvaluateParams, Params, ParamsError

logger = logging.getLogger("setemb.stage.evaluate")

SOURCE = "our run"
FOLD_IMAGES = 1000  # COCO 1K protocol
N_FOLDS_AUTO = 5  # auto adds five_fold_1k when the split has exactly 5 folds (COCO 5K test)
PLOTS_FILE = "recall_at_k.json"


@dataclass
class SplitSets:
    """One split of an embedding store, image-major (captions of image i at ``cpi*i .. cpi*i + cpi - 1``).

    Attributes:
        image: ``[n_images, K, D]`` float32. text: ``[C, L, D]`` float32, ``C = cpi * n_images``.
        image_ids: n_images ids. caption_ids: C ids in the same (image-major) order as ``text``.
        captions_per_image: cpi.
    """

    image: Any
    text: Any
    image_ids: list[str]
    caption_ids: list[str]
    captions_per_image: int


def load_split(store: Any, split: str) -> SplitSets:
    """The split's image and text sets from an ``EmbeddingStore``, captions reordered image-major.

    Raises:
        StageError: the split was not embedded. ValueError: images do not all have the same number of captions.
    """
    import numpy as np

    names = (f"{split}/image", f"{split}/text")
    if any(name not in store.names for name in names):
        raise StageError(
            f"embedding store {store.path} has no {split} split (has {store.names}); add {split!r} to embed.splits "
            "and run `dvc repro embed`"
        )
    image, text = store[names[0]], store[names[1]]
    n_images = len(image.ids)
    c2i = np.asarray(text.caption_to_image, dtype=np.int64)
    counts = np.bincount(c2i, minlength=n_images)
    if len(counts) != n_images or n_images == 0 or (counts != counts[0]).any() or counts[0] == 0:
        bad = np.flatnonzero(counts != np.bincount(counts).argmax())[:5]
        raise ValueError(
            f"{split}: the retrieval protocol needs the same number of captions for every image; images "
            f"{bad.tolist()} have {counts[bad].tolist()} captions"
        )
    order = np.argsort(c2i, kind="stable")  # [C] image-major, caption id order within an image
    return SplitSets(
        image=image.embeddings,
        text=text.embeddings[order],
        image_ids=list(image.ids),
        caption_ids=[text.ids[c] for c in order],
        captions_per_image=int(counts[0]),
    )


def resolve_similarity(
    evaluate: EvaluateParams, model_dir: str | os.PathLike | None, store_attrs: dict[str, Any]
) -> tuple[str, dict[str, Any], str]:
    """``(name, kwargs, source)`` of the similarity to score with.

    ``evaluate.similarity`` (with ``evaluate.similarity_kwargs``) overrides; otherwise the trained similarity from
    ``<model_dir>/config.json`` (or, without a model dir, the embedding store's attrs), with ``similarity_kwargs``
    updating its kwargs.

    Raises:
        ParamsError: unknown similarity or kwargs. FileNotFoundError: ``model_dir`` given but has no config.json.
    """
    from setemb.similarity import create_similarity

    if evaluate.similarity is not None:
        name, kwargs, source = evaluate.similarity, dict(evaluate.similarity_kwargs), "override"
    else:
        trained = store_attrs.get("similarity")
        source = "embeddings"
        if model_dir is not None:
            config_file = Path(model_dir) / "config.json"
            if not config_file.is_file():
                raise FileNotFoundError(f"no config.json in {model_dir}; train first (`dvc repro train`)")
            from_model = json.loads(config_file.read_text()).get("similarity")
            if trained is not None and from_model != trained:
                logger.warning("the model's similarity %s differs from the embeddings' %s (stale embeddings?)",
                               from_model, trained)  # fmt: skip
            trained, source = from_model, "model"
        if not trained:
            raise StageError("no trained similarity recorded; pass --model or set evaluate.similarity")
        name, kwargs = trained["name"], {**trained.get("kwargs", {}), **evaluate.similarity_kwargs}
    try:
        create_similarity(name, **kwargs)
    except (ValueError, TypeError) as e:
        raise ParamsError(f"evaluate.similarity {name!r} with kwargs {kwargs}: {e}") from None
    return name, kwargs, source


def select_elements(sets: Any, elements: list[int] | None, key: str) -> Any:
    """Keep the set elements ``elements`` of ``sets [N, K, D]`` (paper Table 5); None keeps all.

    Raises:
        ParamsError: empty, duplicated or out-of-range indices (named by ``key``).
    """
    if elements is None:
        return sets
    K = sets.shape[1]
    if not elements or len(set(elements)) != len(elements) or any(not 0 <= e < K for e in elements):
        raise ParamsError(f"{key} must be distinct indices in [0, {K}) (sets have {K} elements), got {elements}")
    return sets[:, list(elements)]  # [N, len(elements), D]


def protocols_for(protocol: str, n_images: int, fold_images: int = FOLD_IMAGES) -> list[str]:
    """Protocols to run, the plotted one last: ``auto`` -> five_fold_1k + full for 5 folds of images, else full.

    Raises:
        ParamsError: ``five_fold_1k`` on a split that is not a whole number of folds.
    """
    if protocol == "auto":
        return ["five_fold_1k", "full"] if n_images == N_FOLDS_AUTO * fold_images else ["full"]
    if protocol == "five_fold_1k" and (n_images % fold_images or n_images == 0):
        raise ParamsError(
            f"evaluate.protocol=five_fold_1k needs a multiple of {fold_images} images, the split has {n_images}"
        )
    return [protocol]


def _recall_curve(i2t: Any, t2i: Any, ks: list[int]) -> dict[str, float]:
    """``{f"{d}_r{k}": 100 * mean(rank <= k)}`` of 1-based ranks, for both directions and every k."""
    out = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{direction}_r{k}"] = 100.0 * (ranks <= k).double().mean().item()
    return out


def scope_recall(
    scorer: Callable[[slice, slice], Any],
    image_start: int,
    n_images: int,
    captions_per_image: int,
    block_size: int,
    ks: list[int],
    on_block: Callable[[int, Any], None] | None = None,
) -> dict[str, float]:
    """Streaming recall (M§6) of images ``image_start .. image_start + n_images - 1`` against their own captions.

    One pass: the block-diagonal positives (``positive_pair_scores``), then one ``[block, cpi * n_images]`` row block
    at a time into a ``RankAccumulator``; ``on_block(first_image, block)`` sees each row block (used for i2t
    precision). Returns ``RankAccumulator.compute()``'s keys plus ``{i2t,t2i}_r<k>`` for every k in ``ks``.
    """
    from setemb.metrics import RankAccumulator, positive_pair_scores

    cpi, c0 = captions_per_image, captions_per_image * image_start

    def shifted(images: slice, captions: slice) -> Any:
        return scorer(
            slice(image_start + images.start, image_start + images.stop), slice(c0 + captions.start, c0 + captions.stop)
        )

    acc = RankAccumulator(n_images, positive_pair_scores(shifted, n_images, cpi, block_size), cpi)
    for start in range(0, n_images, block_size):
        stop = min(start + block_size, n_images)
        block = shifted(slice(start, stop), slice(0, cpi * n_images))  # [b, cpi * n_images]
        acc.update(start, block)
        if on_block is not None:
            on_block(image_start + start, block)
    i2t, t2i = acc.ranks()
    merged = {**acc.compute(), **_recall_curve(i2t, t2i, ks)}
    return {key: merged[key] for key in _key_order(merged)}


def _key_order(metrics: dict[str, float]) -> list[str]:
    """Per direction: recalls by k, then medr, meanr; rsum last."""

    def rank(key: str) -> tuple:
        if key == "rsum":
            return (2, 0, "")
        direction, _, name = key.partition("_")
        k = int(name[1:]) if name[:1] == "r" and name[1:].isdigit() else math.inf
        return (0 if direction == "i2t" else 1, k, {"medr": 0, "meanr": 1}.get(name, 2))

    return sorted(metrics, key=rank)


def _finite(tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Drop non-finite floats (JSON has no inf / NaN), logging each."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _finite(value, f"{where}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            logger.info("metric %s%s is %s; left out of metrics.json", where, key, value)
        else:
            out[key] = value
    return out


def _write_json(path: Path, value: Any) -> None:
    write_json_atomic(path, value, indent=2)


def run_evaluate(
    params: Params,
    *,
    embeddings: str | os.PathLike,
    model: str | os.PathLike | None = None,
    relevance: str | os.PathLike | None = None,
    metrics: str | os.PathLike = "metrics.json",
    plots: str | os.PathLike = "plots",
    fold_images: int = FOLD_IMAGES,
) -> dict[str, Any]:
    """Evaluate ``params.evaluate.split`` of the embedding store; write ``metrics`` and ``<plots>/recall_at_k.json``.

    Args:
        params: validated params (``evaluate`` is read).
        embeddings: embedding store (``paths.embeddings``).
        model: exported model directory; its config.json gives the trained similarity (None: the store's attrs).
        relevance: exhaustive caption -> image relevance file (``pipeline.shapes`` format); None or "" skips
            R-Precision / mAP@R. A path that does not exist is an error.
        metrics: metrics.json to write. plots: folder of the recall@K curve.
        fold_images: images per fold of the 1K protocol (1000; smaller only in tests).

    Returns:
        The metrics dict written to ``metrics``.
    """
    import numpy as np
    import torch

    from setemb.embedding_store import EmbeddingStore
    from setemb.metrics import RetrievalPrecisionAccumulator, circular_variance
    from setemb.similarity import score
    from setemb.store import IncompleteStoreError

    ev = params.evaluate
    try:
        store = EmbeddingStore.open(embeddings)
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    if relevance is not None and str(relevance) and not Path(relevance).is_file():
        raise FileNotFoundError(
            f'no relevance file at {relevance}; run `dvc repro prepare`, or set paths.relevance: "" to skip '
            "R-Precision / mAP@R"
        )
    name, kwargs, source = resolve_similarity(ev, model, store.attrs)
    data = load_split(store, ev.split)
    cpi, n_images, n_captions = data.captions_per_image, len(data.image_ids), len(data.caption_ids)
    protocols = protocols_for(ev.protocol, n_images, fold_images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image = select_elements(data.image, ev.image_elements, "evaluate.image_elements").to(device)  # [n, K', D]
    text = select_elements(data.text, ev.text_elements, "evaluate.text_elements").to(device)  # [C, L', D]
    logger.info(
        "%s: %d images x %d, %d captions x %d; similarity %s %s (%s); protocols %s",
        ev.split, n_images, image.shape[1], n_captions, text.shape[1], name, kwargs, source, protocols,
    )  # fmt: skip

    def scorer(images: slice, captions: slice) -> torch.Tensor:
        return score(image[images], text[captions], similarity=name, block_size=ev.block_size, **kwargs)

    rel = None
    if relevance is not None and str(relevance):
        from pipeline.shapes import load_relevance
        from setemb.data import SplitIndex

        index = SplitIndex(
            name=ev.split,
            image_ids=data.image_ids,
            image_paths=None,
            captions=[""] * n_captions,
            caption_ids=data.caption_ids,
            caption_to_image=np.repeat(np.arange(n_images, dtype=np.int64), cpi),
            captions_per_image=cpi,
        )
        rel = torch.from_numpy(load_relevance(relevance, ev.split, index)).to(device)  # [C, n_images] bool
    else:
        logger.info("no relevance file: R-Precision and mAP@R skipped")

    i2t_precision = RetrievalPrecisionAccumulator()

    def i2t_rows(first: int, block: torch.Tensor) -> None:  # block [b, C]: image queries over all captions
        i2t_precision.update(block, rel[:, first : first + len(block)].T)

    with torch.inference_mode():
        results: dict[str, Any] = {}
        for protocol in protocols:
            if protocol == "full":
                results["full"] = scope_recall(
                    scorer, 0, n_images, cpi, ev.block_size, ev.recall_ks, i2t_rows if rel is not None else None
                )
            else:
                folds = [
                    scope_recall(scorer, f * fold_images, fold_images, cpi, ev.block_size, ev.recall_ks)
                    for f in range(n_images // fold_images)
                ]
                results[protocol] = {key: sum(m[key] for m in folds) / len(folds) for key in folds[0]}
        if rel is not None:
            if "full" not in results:  # i2t rows were not streamed by a full pass
                for start in range(0, n_images, ev.block_size):
                    stop = min(start + ev.block_size, n_images)
                    i2t_rows(start, scorer(slice(start, stop), slice(0, n_captions)))
            t2i_precision = RetrievalPrecisionAccumulator()
            for c0 in range(0, n_captions, ev.block_size):
                c1 = min(c0 + ev.block_size, n_captions)
                t2i_precision.update(scorer(slice(0, n_images), slice(c0, c1)).T, rel[c0:c1])  # [c, n_images]
            results["precision"] = {
                **{f"t2i_{k}": v for k, v in t2i_precision.compute().items()},
                **{f"i2t_{k}": v for k, v in i2t_precision.compute().items()},
            }
        cv = {}
        for modality, sets in (("image", data.image), ("text", data.text)):
            values = circular_variance(sets).double()  # [N]
            cv[f"{modality}_mean"] = values.mean().item()
            cv[f"{modality}_log_mean"] = math.log(cv[f"{modality}_mean"]) if cv[f"{modality}_mean"] > 0 else -math.inf
        results["circular_variance"] = cv

    def elements(sel: list[int] | None) -> str:
        return "all" if sel is None else ",".join(map(str, sel))

    results["info"] = {
        "source": SOURCE,
        "protocol": "+".join(protocols),
        "split": ev.split,
        "similarity": name,
        "similarity_kwargs": json.dumps(kwargs, sort_keys=True),
        "similarity_source": source,
        "image_elements": elements(ev.image_elements),
        "text_elements": elements(ev.text_elements),
        "n_images": n_images,
        "n_captions": n_captions,
        "captions_per_image": cpi,
        "model_epoch": store.attrs.get("model_epoch"),
        "embeddings": str(embeddings),
    }
    results = _finite(results)
    curve = results["full"] if "full" in results else results[protocols[-1]]
    rows = [
        {"k": k, "recall": curve[f"{direction}_r{k}"], "direction": direction}
        for direction in ("i2t", "t2i")
        for k in ev.recall_ks
    ]
    _write_json(Path(metrics), results)
    _write_json(Path(plots) / PLOTS_FILE, rows)
    return results


def metrics_table(results: dict[str, Any]) -> Any:
    """A rich Table: one row per metric, one column per protocol; precision and circular variance below."""
    from rich.table import Table

    protocols = [p for p in ("five_fold_1k", "full") if p in results]
    info = results["info"]
    table = Table(
        title=f"{info['split']} ({info['n_images']} images, {info['n_captions']} captions), {info['similarity']}, "
        f"{info['source']}"
    )
    table.add_column("metric")
    labels = {"five_fold_1k": "1K (5-fold)", "full": f"full ({info['n_images']})"}
    for p in protocols:
        table.add_column(labels[p], justify="right")
    keys = list(results[protocols[0]])
    for key in keys:
        table.add_row(key, *(f"{results[p][key]:.2f}" if key in results[p] else "-" for p in protocols))
    for group in ("precision", "circular_variance"):
        for key, value in results.get(group, {}).items():
            table.add_row(f"{group}.{key}", *[f"{value:.3f}"] + [""] * (len(protocols) - 1))
    return table
