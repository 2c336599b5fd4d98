"""COCO 5K benchmarks through the official evaluator, the `eccv_caption` package (Chun et al., ECCV Caption, 2022).

``evaluate.benchmarks`` picks them: ``eccv_caption`` (ECCV Caption mAP@R, R-Precision, R@1), ``cxc``
(CrissCrossed Captions R@K) and ``pmrp`` (plausible-match R-Precision, PCME). `run_benchmarks` ranks the split with
the streaming scorer (`setemb.similarity.score` with ``topk``: one block of queries at a time), turns store ids into
COCO ids (`pipeline.coco_ids`), hands the ranked lists to ``Metrics().compute_all_metrics`` and returns percentages.

What the package needs from each ranked list (read from its ``_metrics.py``, 0.1.0):

- R-Precision / mAP@R (``eccv_*``, ``pmrp``) read the top R items of a query, R = its number of positives. A shorter
  list is not an error there: ``rprecision`` divides by the items it got, so a short list inflates the score
  silently. Every list here therefore holds at least R items (R taken from the same ground truth).
- R@K reads the top K items; ``coco_1k_*`` filters a 5K list down to the query's fold first (so it would need the
  whole ranking; not used here, the stage's own ``five_fold_1k`` protocol is the COCO 1K number).
- The ECCV Caption i2t ground truth names 2 positive captions outside the 25,000 test captions (467259, 144675):
  they count in R and can never be retrieved, in the official numbers as here.
- Only the queries of each ground truth are evaluated (ECCV Caption: 1,261 image and 1,332 caption queries), but a
  missing query raises ``KeyError``: lists are built for exactly those queries.
- Metric-name pitfalls of ``compute_all_metrics``: ECCV R-Precision is only computed when ``eccv_map_at_r`` is
  requested too (the code tests a misspelt ``'eccv_rpresion'``), and its R@1 only comes back when ``eccv_r1`` is
  named; ``cxc_recalls`` needs ``Ks``; ``pmrp`` silently returns nothing without plausible-match ground truth, and
  otherwise merges its bare ``{"i2t", "t2i"}`` into the top level of the result (it is requested alone here). So
  each benchmark is requested by its exact names and a missing result is an error. The package returns fractions
  and draws a tqdm bar on stderr for ECCV metrics regardless of ``verbose``; both are handled here.

metrics.json groups (percent, like the rest)::

    "eccv_caption": {"i2t_map_at_r", "i2t_r_precision", "i2t_r1", "t2i_map_at_r", "t2i_r_precision", "t2i_r1"}
    "cxc":          {"i2t_r<k>", "t2i_r<k>" for k in evaluate.benchmark_ks}
    "pmrp":         {"i2t", "t2i"}   (zeta = evaluate.pmrp_zeta, default 2, own pairs omitted: pm_*.json convention)
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.coco_ids import CocoIdError, CocoIds, category_codes, plausible_match_sets, read_pm_files

logger = logging.getLogger(__name__)

BENCHMARKS = ("eccv_caption", "cxc", "pmrp")
N_TEST_IMAGES, N_TEST_CAPTIONS = 5000, 25000


def _metrics_class() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson" when it is absent
        from eccv_caption import Metrics
    return Metrics


def package_test_split() -> tuple[np.ndarray, dict[int, list[int]]]:
    """The package's 25,000 test caption annotation ids (image-major) and its original image -> captions pairs."""
    metrics = _metrics_class()()
    return np.asarray(metrics.coco_ids, dtype=np.int64), metrics.coco_gts["i2t"]


def check_test_split(image_coco: list[int], caption_coco: list[int], caption_image_coco: list[int]) -> None:
    """The mapped split must be the Karpathy 5K test split the package's ground truth covers, pair for pair.

    Raises:
        CocoIdError: other images or captions, or a caption paired with another image than in COCO.
    """
    coco_ids, i2t = package_test_split()
    want_images, want_captions = set(i2t), set(coco_ids.tolist())
    if set(image_coco) != want_images or set(caption_coco) != want_captions:
        raise CocoIdError(
            f"COCO benchmarks need the Karpathy 5K test split ({len(want_images)} images, {len(want_captions)} "
            f"captions); the evaluated split maps to {len(set(image_coco))} images and {len(set(caption_coco))} "
            f"captions, {len(set(caption_coco) - want_captions)} of them outside it"
        )
    owner = {cid: iid for iid, cids in i2t.items() for cid in cids}
    wrong = [(c, i) for c, i in zip(caption_coco, caption_image_coco, strict=True) if owner[c] != i]
    if wrong:
        raise CocoIdError(f"{len(wrong)} captions are paired with other images than in COCO (first: {wrong[0]})")


def _needed_lengths(gts: list[dict[int, list[int]]], ks: list[int], use_r: list[bool]) -> dict[int, int]:
    """query id -> list length it needs over several ground truths: R (its positives) or max(ks)."""
    need: dict[int, int] = {}
    for gt, by_r in zip(gts, use_r, strict=True):
        for q, positives in gt.items():
            need[q] = max(need.get(q, 0), len(set(positives)) if by_r else max(ks))
    return need


def ranked_lists(
    topk: Callable[[list[int], int], np.ndarray],
    query_rows: dict[int, int],
    gallery_ids: np.ndarray,
    need: dict[int, int],
    block: int,
) -> dict[int, list[int]]:
    """``{query id: [gallery ids, best first]}`` of length ``need[q]``, scored a block of queries at a time.

    Args:
        topk: ``(query rows, k) -> [len(rows), k]`` int64 gallery rows, best first (ties: lower row first).
        query_rows: query id -> its row in the store. gallery_ids: [G] int64 COCO id of each gallery row.
        need: query id -> list length needed (`_needed_lengths`). block: queries per scoring call.
    """
    G = len(gallery_ids)
    gallery = gallery_ids.tolist()  # shared int objects: lists reference them, never copy
    queries = sorted(need, key=lambda q: query_rows[q])
    out: dict[int, list[int]] = {}
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        k = min(G, max(need[q] for q in chunk))
        rows = topk([query_rows[q] for q in chunk], k)  # [b, k]
        for q, row in zip(chunk, rows.tolist(), strict=True):
            out[q] = [gallery[g] for g in row[: need[q]]]
    return out


def _percent(scores: dict[str, Any], key: str) -> dict[str, float]:
    if key not in scores or scores[key] is None:
        raise RuntimeError(f"eccv_caption returned no {key!r} (got {sorted(scores)})")
    return {d: 100.0 * float(scores[key][d]) for d in ("i2t", "t2i")}


def compute_benchmarks(
    benchmarks: list[str],
    i2t_topk: Callable[[list[int], int], np.ndarray],
    t2i_topk: Callable[[list[int], int], np.ndarray],
    image_coco: list[int],
    caption_coco: list[int],
    *,
    ks: list[int],
    block: int = 256,
    pm_gts: tuple[dict[int, list[int]], dict[int, list[int]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Rank with ``i2t_topk`` / ``t2i_topk`` and score ``benchmarks`` with ``eccv_caption.Metrics``.

    Args:
        benchmarks: names from `BENCHMARKS`.
        i2t_topk: ``(image rows, k) -> [b, k]`` caption rows best first. t2i_topk: the same for caption queries.
        image_coco: [n_images] COCO image id of each image row. caption_coco: [C] annotation id of each caption row.
        ks: R@K cut-offs for ``cxc``.
        pm_gts: ``(i2t, t2i)`` plausible-match ground truth; required for ``pmrp``.

    Returns:
        ``{benchmark: {metric: percent}}`` with the keys of the module docstring.
    """
    metrics = _metrics_class()()
    plan: list[tuple[str, dict[str, dict[int, list[int]]], bool]] = []  # (benchmark, gts, lists of length R?)
    if "eccv_caption" in benchmarks:
        plan.append(("eccv_caption", metrics.eccv_gts, True))
    if "cxc" in benchmarks:
        plan.append(("cxc", metrics.cxc_gts, False))
    if "pmrp" in benchmarks:
        if pm_gts is None:
            raise CocoIdError("pmrp needs plausible-match ground truth: set paths.coco_instances or paths.coco_pm_dir")
        metrics.pm_gts = {"i2t": pm_gts[0], "t2i": pm_gts[1]}  # what Metrics.set_pm_gts stores from the files
        plan.append(("pmrp", metrics.pm_gts, True))
    if not plan:
        return {}
    image_rows = {iid: r for r, iid in enumerate(image_coco)}
    caption_rows = {cid: r for r, cid in enumerate(caption_coco)}
    ks = sorted(set(ks))
    lists = {}
    for direction, rows, gallery, topk in (
        ("i2t", image_rows, np.asarray(caption_coco, dtype=np.int64), i2t_topk),
        ("t2i", caption_rows, np.asarray(image_coco, dtype=np.int64), t2i_topk),
    ):
        need = _needed_lengths([gts[direction] for _, gts, _ in plan], ks, [by_r for *_, by_r in plan])
        missing = [q for q in need if q not in rows]
        if missing:
            raise CocoIdError(
                f"{len(missing)} {direction} benchmark queries are not in the split (first: {missing[0]})"
            )
        lists[direction] = ranked_lists(topk, rows, gallery, need, block)
        logger.info("%s: %d ranked lists, longest %d", direction, len(need), max(need.values()))
    results: dict[str, dict[str, float]] = {}
    with contextlib.redirect_stderr(io.StringIO()):  # the package's unconditional tqdm bar
        for name, _, _ in plan:
            if name == "eccv_caption":
                targets = ["eccv_map_at_r", "eccv_rprecision", "eccv_r1"]
                scores = metrics.compute_all_metrics(lists["i2t"], lists["t2i"], target_metrics=targets, verbose=False)
                labels = {"eccv_map_at_r": "map_at_r", "eccv_rprecision": "r_precision", "eccv_r1": "r1"}
                per_key = {labels[t]: _percent(scores, t) for t in targets}
            elif name == "cxc":
                scores = metrics.compute_all_metrics(
                    lists["i2t"], lists["t2i"], target_metrics=["cxc_recalls"], Ks=ks, verbose=False
                )
                per_key = {f"r{k}": _percent(scores, f"cxc_r{k}") for k in ks}
            else:
                scores = metrics.compute_all_metrics(lists["i2t"], lists["t2i"], target_metrics=["pmrp"], verbose=False)
                per_key = {"": _percent({"pmrp": scores} if "i2t" in scores else {}, "pmrp")}  # merged at top level
            results[name] = {
                f"{d}_{label}" if label else d: values[d] for d in ("i2t", "t2i") for label, values in per_key.items()
            }
    return results


def pm_ground_truth(
    image_coco: list[int], *, instances_json: str | None, pm_dir: str | None, zeta: int = 2
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Plausible-match ground truth: the package's ``pm_*.json`` from ``pm_dir``, else computed from the instances
    at Hamming threshold ``zeta`` (own pairs omitted, the files' convention).

    Raises:
        CocoIdError: neither file given, or ``pm_dir`` with a ``zeta`` other than the files' 2.
    """
    if pm_dir:
        if zeta != 2:
            raise CocoIdError(f"eccv-caption's pm_*.json files are zeta = 2; unset paths.coco_pm_dir for zeta {zeta}")
        return read_pm_files(pm_dir)
    if not instances_json:
        raise CocoIdError(
            "pmrp needs COCO instance labels: set paths.coco_instances to instances_val2014.json "
            "(or paths.coco_pm_dir to a folder with eccv-caption's pm_image_to_caption.json / pm_caption_to_image.json)"
        )
    _, i2t = package_test_split()
    coded_ids, codes = category_codes(instances_json, image_coco)
    logger.info("plausible matches: %d of %d images have instance labels", len(coded_ids), len(image_coco))
    return plausible_match_sets(codes, coded_ids, i2t, zeta=zeta, omit_original=True)


def run_benchmarks(
    params: Any,
    *,
    image: Any,
    text: Any,
    image_ids: list[str],
    caption_ids: list[str],
    similarity: str,
    similarity_kwargs: dict[str, Any],
) -> dict[str, dict[str, float]]:
    """The COCO benchmarks of ``params.evaluate.benchmarks`` on one split (the hook of the evaluate stage).

    Args:
        params: validated `Params` (``evaluate``, ``extract.source``/``captions_per_image`` and the COCO paths).
        image: ``[n, K, D]`` image sets; text: ``[C, L, D]`` caption sets, image-major, on the scoring device.
        image_ids / caption_ids: the store ids of those rows.
        similarity / similarity_kwargs: what the recall protocol scores with.

    Returns:
        ``{benchmark: {metric: percent}}``; empty when no COCO benchmark is selected.
    """
    import torch

    from setemb.similarity import score

    ev, paths = params.evaluate, params.paths
    chosen = [b for b in ev.benchmarks if b in BENCHMARKS]
    if not chosen:
        return {}
    ids = coco_ids_for(params, ev.split)
    missing = [c for c in caption_ids if c not in ids.captions] + [i for i in image_ids if i not in ids.images]
    if missing:
        raise CocoIdError(f"{len(missing)} embedded items have no COCO id (first: {missing[0]}); re-run extract/embed")
    image_coco = [ids.images[i] for i in image_ids]
    caption_coco = [ids.captions[c] for c in caption_ids]
    check_test_split(image_coco, caption_coco, [ids.caption_images[c] for c in caption_ids])
    pm = None
    if "pmrp" in chosen:
        pm = pm_ground_truth(
            image_coco,
            instances_json=paths.coco_instances or None,
            pm_dir=paths.coco_pm_dir or None,
            zeta=ev.pmrp_zeta,
        )

    def i2t_topk(rows: list[int], k: int) -> np.ndarray:  # image queries over all captions
        _, idx = score(image[rows], text, similarity=similarity, block_size=ev.block_size, topk=k, **similarity_kwargs)
        return idx.cpu().numpy()

    def t2i_topk(rows: list[int], k: int) -> np.ndarray:  # caption queries over all images
        # Every registered similarity is symmetric (score(a, b) == score(b, a).T up to rounding), so captions can be
        # the queries and the streaming top-k applies; ties: lower image row first.
        _, idx = score(text[rows], image, similarity=similarity, block_size=ev.block_size, topk=k, **similarity_kwargs)
        return idx.cpu().numpy()

    with torch.inference_mode():
        return compute_benchmarks(
            chosen, i2t_topk, t2i_topk, image_coco, caption_coco, ks=ev.benchmark_ks, block=ev.block_size, pm_gts=pm
        )


def coco_ids_for(params: Any, split: str) -> CocoIds:
    """`CocoIds` of ``split`` from the configured source and ``paths.coco_captions``."""
    from pipeline.coco_ids import split_coco_ids

    return split_coco_ids(
        params.extract.source,
        split,
        params.extract.captions_per_image,
        params.paths.coco_captions or None,
        dataset_json=params.paths.dataset_json,
        precomp_root=params.paths.precomp_root,
    )
