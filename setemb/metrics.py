"""Retrieval metrics (M§6): recall@K (COCO 5K, 1K five-fold, streaming), R-Precision, mAP@R, circular variance.

Conventions shared by every function here:

* A similarity matrix ``sims`` is ``[n_images, n_captions]``; a larger score means more similar. Captions
  ``cpi*i .. cpi*i + cpi - 1`` belong to image ``i`` (``cpi`` = ``captions_per_image``, 5 for COCO / Flickr30K).
* Tie rule for recall: the rank of a query counts only the *wrong* gallery items whose score is **strictly greater**
  than the positive's score. A wrong item that ties with the positive does not hurt the query; for image-to-text the
  other positive captions never count against the query. Ranks are therefore exact integer counts (no argsort needed).
* Recalls, R-Precision and mAP@R are percentages (fraction * 100), so they add up into RSUM the same way.
* Inputs may be numpy arrays or torch tensors (any device); computation runs in torch on the input's device and in row
  blocks of ``block_size`` so at most ``O(block_size * n_captions)`` extra memory is allocated. Outputs are floats.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "RECALL_KEYS",
    "RankAccumulator",
    "RetrievalPrecisionAccumulator",
    "circular_variance",
    "five_fold_1k",
    "log_mean_circular_variance",
    "map_at_r",
    "map_at_r_per_query",
    "positive_pair_scores",
    "r_precision",
    "r_precision_per_query",
    "recall_at_k",
    "recall_at_k_streaming",
    "retrieval_ranks",
]

Scorer = Callable[[slice, slice], "Tensor | np.ndarray"]
"""``scorer(image_slice, caption_slice) -> [ni, nc]`` block of the similarity matrix (numpy or torch)."""

RECALL_KS = (1, 5, 10)
RECALL_KEYS = (
    *(f"i2t_r{k}" for k in RECALL_KS),
    "i2t_medr",
    "i2t_meanr",
    *(f"t2i_r{k}" for k in RECALL_KS),
    "t2i_medr",
    "t2i_meanr",
    "rsum",
)
DEFAULT_BLOCK_SIZE = 1024


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    """Numpy or torch -> torch (same device); non-float dtypes become float64."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _check_sims(sims: Tensor, n_images: int, n_captions: int, name: str = "sims") -> None:
    if sims.dim() != 2 or tuple(sims.shape) != (n_images, n_captions):
        raise ValueError(f"{name}: expected shape [{n_images}, {n_captions}], got {list(sims.shape)}")


def _check_layout(n_images: int, n_captions: int, captions_per_image: int) -> None:
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if n_images < 1:
        raise ValueError(f"need at least one image, got n_images={n_images}")
    if n_captions != captions_per_image * n_images:
        raise ValueError(
            f"expected n_captions == captions_per_image * n_images = {captions_per_image} * {n_images} = "
            f"{captions_per_image * n_images}, got n_captions={n_captions}"
        )


def _summarise(ranks: Tensor, prefix: str) -> dict[str, float]:
    """1-based ranks [Q] -> ``{prefix}_r{1,5,10}``, ``{prefix}_medr``, ``{prefix}_meanr``.

    ``R@K = 100 * mean[rank <= K]`` (1-based; M§6 writes ``rank < K`` with 0-based ranks).
    MedR follows M§6 / VSE++ ``floor(median(rank0)) + 1`` with 0-based ranks and numpy's median (mean of the two middle
    values for an even count); in 1-based terms this is ``floor(median(rank1))``, e.g. ranks ``[1, 2]`` -> 1 and
    ``[1, 3, 4, 10]`` -> 3. MeanR is the mean 1-based rank.
    """
    r = ranks.to(torch.float64)
    out = {f"{prefix}_r{k}": 100.0 * (r <= k).double().mean().item() for k in RECALL_KS}
    s = torch.sort(r).values
    n = s.numel()
    median = 0.5 * (s[(n - 1) // 2] + s[n // 2])
    out[f"{prefix}_medr"] = float(math.floor(median.item()))
    out[f"{prefix}_meanr"] = r.mean().item()
    return out


def _recall_dict(i2t_ranks: Tensor, t2i_ranks: Tensor) -> dict[str, float]:
    out = {**_summarise(i2t_ranks, "i2t"), **_summarise(t2i_ranks, "t2i")}
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS)
    return {key: out[key] for key in RECALL_KEYS}


class RankAccumulator:
    """Streaming image-to-text and text-to-image ranks over row blocks of the ``[n_images, n_captions]`` matrix (M§6).

    i2t: each block row holds a whole image query, so its rank (number of wrong captions scored strictly above the best
    of its ``cpi`` positive captions) is final after one ``update``.

    t2i: a caption's rank needs its column over all images. Design choice: the caller passes ``positive_scores`` [C],
    the score of every caption with its own image, up front (see `positive_pair_scores`, which scores only the
    block-diagonal tiles, ``cpi * n_images * block`` pairs, a small fraction of the full matrix). Each block then
    adds, per caption, the number of *wrong* images in the block scored strictly above the positive score, so one
    pass over the rows suffices. The positive image's own entry is never counted, whatever its value.

    The positive score must come from the same computation as the blocks for ties to be judged exactly as the dense
    `recall_at_k` judges them; a scorer whose value for a pair depends on the tile it is computed in (e.g. float matmul
    with different tile shapes) can differ in the last bit, which only matters for exact ties. ``update`` compares the
    positives it sees in the blocks with ``positive_scores`` and `compute` logs a warning when any differ.

    Args:
        n_images: number of images (rows).
        positive_scores: [C] float, ``C = captions_per_image * n_images``; entry ``c`` = ``sims[c // cpi, c]``.
        captions_per_image: captions per image (cpi).
    """

    def __init__(self, n_images: int, positive_scores: Tensor | np.ndarray, captions_per_image: int = 5) -> None:
        pos = _as_tensor(positive_scores)
        n_captions = captions_per_image * n_images
        _check_layout(n_images, n_captions, captions_per_image)
        if pos.dim() != 1 or pos.shape[0] != n_captions:
            raise ValueError(f"positive_scores: expected shape [{n_captions}], got {list(pos.shape)}")
        if torch.isnan(pos).any():
            raise ValueError("positive_scores contains NaN")
        self.n_images, self.n_captions, self.captions_per_image = n_images, n_captions, captions_per_image
        self.positive_scores = pos
        self._seen = torch.zeros(n_images, dtype=torch.bool)  # host-side bookkeeping, no device sync
        self._i2t = torch.zeros(n_images, dtype=torch.long, device=pos.device)  # 0-based counts
        self._t2i = torch.zeros(n_captions, dtype=torch.long, device=pos.device)
        self._has_nan = torch.zeros((), dtype=torch.bool, device=pos.device)
        self._mismatch = torch.zeros((), dtype=torch.long, device=pos.device)

    def update(self, image_offset: int, block: Tensor | np.ndarray) -> None:
        """Consume rows ``image_offset .. image_offset + ni - 1``.

        Args:
            image_offset: global index of the block's first image.
            block: [ni, C] float, the similarity rows of those images against all captions.
        """
        block = _as_tensor(block)
        if block.dim() != 2 or block.shape[1] != self.n_captions:
            raise ValueError(f"block: expected shape [ni, {self.n_captions}], got {list(block.shape)}")
        ni, cpi = block.shape[0], self.captions_per_image
        if image_offset < 0 or image_offset + ni > self.n_images:
            raise ValueError(f"rows {image_offset}..{image_offset + ni - 1} outside 0..{self.n_images - 1}")
        if self._seen[image_offset : image_offset + ni].any():
            raise ValueError(f"rows {image_offset}..{image_offset + ni - 1} overlap rows already consumed")
        self._seen[image_offset : image_offset + ni] = True
        if ni == 0:
            return
        dev = block.device
        for name in ("_i2t", "_t2i", "_has_nan", "_mismatch", "positive_scores"):
            setattr(self, name, getattr(self, name).to(dev))
        self._has_nan |= torch.isnan(block).any()

        rows = torch.arange(ni, device=dev)
        own = torch.arange(image_offset, image_offset + ni, device=dev)
        grouped = block.reshape(ni, self.n_images, cpi)  # [ni, n_images, cpi]
        own_pos = grouped[rows, own]  # [ni, cpi] scores of each row's own captions

        # i2t: wrong captions strictly above the best positive; positives are <= their max so never count.
        best = own_pos.amax(dim=1)  # [ni]
        self._i2t[image_offset : image_offset + ni] = (block > best[:, None]).sum(dim=1)

        # t2i: per caption, wrong images in this block strictly above the caption's positive score.
        greater = block > self.positive_scores[None, :]  # [ni, C] bool
        greater.view(ni, self.n_images, cpi)[rows, own] = False  # the positive image itself never counts
        self._t2i += greater.sum(dim=0)

        cols = slice(cpi * image_offset, cpi * (image_offset + ni))
        self._mismatch += (own_pos.reshape(-1) != self.positive_scores[cols]).sum()

    def ranks(self) -> tuple[Tensor, Tensor]:
        """1-based ranks ``(i2t [n_images], t2i [C])`` long; raises ValueError if rows are missing or NaN was seen."""
        if not bool(self._seen.all()):
            missing = torch.nonzero(~self._seen).flatten()
            raise ValueError(f"{missing.numel()} image rows never consumed (first: {missing[:5].tolist()})")
        if bool(self._has_nan):
            raise ValueError("similarity matrix contains NaN")
        n_bad = int(self._mismatch)
        if n_bad:
            logger.warning(
                "%d positive scores seen in the blocks differ from positive_scores; exact ties may be judged "
                "differently from the dense recall_at_k (score each pair identically in every tile to avoid this)",
                n_bad,
            )
        return self._i2t + 1, self._t2i + 1

    def compute(self) -> dict[str, float]:
        """Recall metrics with the keys `RECALL_KEYS` (see `recall_at_k`)."""
        return _recall_dict(*self.ranks())


def _positives_from_matrix(sims: Tensor, captions_per_image: int) -> Tensor:
    n_captions = sims.shape[1]
    cols = torch.arange(n_captions, device=sims.device)
    return sims[cols // captions_per_image, cols]  # [C]


def retrieval_ranks(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[Tensor, Tensor]:
    """1-based i2t and t2i ranks of a full similarity matrix (M§6), computed in row blocks.

    i2t rank of image i = 1 + #{wrong captions with score > max of its cpi positive captions} (best of its captions).
    t2i rank of caption c = 1 + #{images other than c // cpi with score > sims[c // cpi, c]}. Ties with wrong items
    favour the query.

    Args:
        sims: [n_images, C] float, ``C = captions_per_image * n_images``.
        captions_per_image: captions per image (cpi).
        block_size: image rows per block.

    Returns:
        ``(i2t [n_images], t2i [C])`` long tensors on the input's device.
    """
    sims = _as_tensor(sims)
    if sims.dim() != 2:
        raise ValueError(f"sims: expected a 2-D [n_images, n_captions] matrix, got shape {list(sims.shape)}")
    n_images, n_captions = sims.shape
    _check_layout(n_images, n_captions, captions_per_image)
    acc = RankAccumulator(n_images, _positives_from_matrix(sims, captions_per_image), captions_per_image)
    for start in range(0, n_images, block_size):
        acc.update(start, sims[start : start + block_size])
    return acc.ranks()


def recall_at_k(
    sims: Tensor | np.ndarray, captions_per_image: int = 5, block_size: int = DEFAULT_BLOCK_SIZE
) -> dict[str, float]:
    """Bidirectional recall@{1,5,10}, MedR, MeanR and RSUM of a full similarity matrix (M§6, COCO 5K / F30K 1K).

    Keys (`RECALL_KEYS`): ``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1, t2i_r5, t2i_r10, t2i_medr,
    t2i_meanr, rsum``. Recalls are percentages, ``R@K = 100 * mean[rank <= K]`` with 1-based ranks; the i2t rank is the
    best rank among the image's cpi captions; only wrong items scored *strictly* higher count (ties favour the query).
    ``MedR = floor(median(1-based ranks))`` (= M§6's ``floor(median(0-based)) + 1``, numpy median), ``MeanR`` = mean
    1-based rank, ``RSUM`` = sum of the six recalls.

    Args:
        sims: [n_images, C] float (numpy or torch), ``C = captions_per_image * n_images``.
        captions_per_image: captions per image (cpi).
        block_size: image rows per block (memory is ``O(block_size * C)``).

    Raises:
        ValueError: not 2-D, ``C != cpi * n_images``, or NaN anywhere.
    """
    return _recall_dict(*retrieval_ranks(sims, captions_per_image, block_size))


def positive_pair_scores(
    scorer: Scorer, n_images: int, captions_per_image: int = 5, block_size: int = DEFAULT_BLOCK_SIZE
) -> Tensor:
    """Scores of every caption with its own image, from the block-diagonal tiles only.

    Calls ``scorer(slice(a, b), slice(cpi * a, cpi * b))`` for consecutive image blocks (the same image slices the row
    pass of `recall_at_k_streaming` uses), i.e. ``cpi * n_images * block_size`` pairs in total.

    Returns:
        [C] float, entry ``c`` = ``sims[c // cpi, c]``.
    """
    cpi, parts = captions_per_image, []
    for start in range(0, n_images, block_size):
        stop = min(start + block_size, n_images)
        tile = _as_tensor(scorer(slice(start, stop), slice(cpi * start, cpi * stop)))
        _check_sims(tile, stop - start, cpi * (stop - start), "scorer output")
        ni = stop - start
        rows = torch.arange(ni, device=tile.device)
        parts.append(tile.reshape(ni, ni, cpi)[rows, rows].reshape(-1))  # [ni * cpi]
    return torch.cat(parts)


def recall_at_k_streaming(
    scorer: Scorer,
    n_images: int,
    n_captions: int,
    captions_per_image: int = 5,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, float]:
    """`recall_at_k` without materialising the matrix: only one ``[block_size, C]`` block exists at a time.

    Pass 1 (`positive_pair_scores`) scores the block-diagonal tiles to get every caption's positive score; pass 2 calls
    ``scorer(slice(a, b), slice(0, C))`` per image block and feeds a `RankAccumulator`. Equal to `recall_at_k` on the
    full matrix whenever the scorer gives a pair the same value in every tile (see `RankAccumulator` on ties).

    Args:
        scorer: ``scorer(image_slice, caption_slice) -> [ni, nc]`` numpy or torch block.
        n_images: number of images; ``n_captions`` must equal ``captions_per_image * n_images``.
        block_size: image rows per block.
    """
    _check_layout(n_images, n_captions, captions_per_image)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    pos = positive_pair_scores(scorer, n_images, captions_per_image, block_size)
    acc = RankAccumulator(n_images, pos, captions_per_image)
    for start in range(0, n_images, block_size):
        stop = min(start + block_size, n_images)
        block = _as_tensor(scorer(slice(start, stop), slice(0, n_captions)))
        _check_sims(block, stop - start, n_captions, "scorer output")
        acc.update(start, block)
    return acc.compute()


def five_fold_1k(
    sims_or_scorer: Tensor | np.ndarray | Scorer,
    captions_per_image: int = 5,
    n_folds: int = 5,
    fold_images: int = 1000,
    block_size: int | None = None,
) -> dict[str, float]:
    """COCO 1K protocol (M§6): `recall_at_k` inside each fold of ``fold_images`` consecutive images, averaged.

    Fold f ranks images ``fold_images*f ..`` against their captions ``cpi*fold_images*f .. cpi*fold_images*(f+1) - 1``
    only; every key (MedR and MeanR included, as in VSE++/DivE eval) is the mean over folds, so RSUM of the averages is
    the average of the RSUMs.

    Args:
        sims_or_scorer: either the full ``[n_folds*fold_images, cpi*n_folds*fold_images]`` matrix, or a scorer
            ``scorer(image_slice, caption_slice) -> [ni, nc]`` so that only one fold's scores exist at a time.
        captions_per_image: captions per image (cpi).
        n_folds: number of folds (5).
        fold_images: images per fold (1000).
        block_size: with a scorer, stream each fold in image blocks of this size (`recall_at_k_streaming`); None
            scores each fold as one ``[fold_images, cpi*fold_images]`` block.

    Raises:
        ValueError: matrix shape is not ``[n_folds*fold_images, cpi*n_folds*fold_images]``, or NaN.
    """
    if n_folds < 1 or fold_images < 1:
        raise ValueError(f"n_folds and fold_images must be >= 1, got {n_folds} and {fold_images}")
    cpi = captions_per_image
    per_fold = []
    if callable(sims_or_scorer):
        scorer = sims_or_scorer
        for f in range(n_folds):
            i0, c0 = f * fold_images, f * fold_images * cpi
            if block_size is None:
                block = _as_tensor(scorer(slice(i0, i0 + fold_images), slice(c0, c0 + cpi * fold_images)))
                _check_sims(block, fold_images, cpi * fold_images, "scorer output")
                per_fold.append(recall_at_k(block, cpi))
            else:

                def shifted(img: slice, cap: slice, i0: int = i0, c0: int = c0) -> Tensor | np.ndarray:
                    return scorer(slice(i0 + img.start, i0 + img.stop), slice(c0 + cap.start, c0 + cap.stop))

                per_fold.append(recall_at_k_streaming(shifted, fold_images, cpi * fold_images, cpi, block_size))
    else:
        sims = _as_tensor(sims_or_scorer)
        _check_sims(sims, n_folds * fold_images, cpi * n_folds * fold_images)
        for f in range(n_folds):
            i0, c0 = f * fold_images, f * fold_images * cpi
            per_fold.append(recall_at_k(sims[i0 : i0 + fold_images, c0 : c0 + cpi * fold_images], cpi))
    return {key: sum(m[key] for m in per_fold) / n_folds for key in RECALL_KEYS}


# --------------------------------------------------------------------------------------------------------------------
# ECCV Caption R-Precision and mAP@R


def _check_relevance(sims: Tensor, relevance: Tensor) -> None:
    if sims.dim() != 2:
        raise ValueError(f"sims: expected a 2-D [Q, G] matrix, got shape {list(sims.shape)}")
    if tuple(relevance.shape) != tuple(sims.shape):
        raise ValueError(f"relevance: expected shape {list(sims.shape)} (same as sims), got {list(relevance.shape)}")
    if torch.isnan(sims).any():
        raise ValueError("sims contains NaN")


def _precision_at_r(
    sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray, block_size: int
) -> tuple[Tensor, Tensor]:
    """Per-query R-Precision and mAP@R in percent, [Q] float64 each; NaN where the query has no relevant item."""
    sims = _as_tensor(sims)
    relevance = torch.as_tensor(relevance, device=sims.device).bool()
    _check_relevance(sims, relevance)
    Q, G = sims.shape
    rp_parts, ap_parts = [], []
    position = torch.arange(1, G + 1, device=sims.device, dtype=torch.float64)  # [G] 1-based
    for start in range(0, Q, block_size):
        s, rel = sims[start : start + block_size], relevance[start : start + block_size]  # [b, G]
        # Stable descending sort: equal scores keep index order, so the lower gallery index ranks first.
        order = torch.sort(s, dim=1, descending=True, stable=True).indices  # [b, G]
        hit = rel.gather(1, order).to(torch.float64)  # [b, G] relevance in ranked order
        R = rel.sum(dim=1)  # [b]
        hits = hit.cumsum(dim=1)  # [b, G] relevant items in the top r
        in_top_r = position[None, :] <= R[:, None]  # [b, G]
        Rf = R.to(torch.float64).clamp(min=1)
        rp = (hits * (position[None, :] == R[:, None])).sum(dim=1) / Rf  # |top-R ∩ GT| / R
        ap = (hits / position * hit * in_top_r).sum(dim=1) / Rf  # (1/R) Σ_{r<=R} P@r [item r relevant]
        nan = torch.full_like(rp, float("nan"))
        rp_parts.append(torch.where(R > 0, 100.0 * rp, nan))
        ap_parts.append(torch.where(R > 0, 100.0 * ap, nan))
    return torch.cat(rp_parts), torch.cat(ap_parts)


def r_precision_per_query(
    sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> Tensor:
    """ECCV Caption R-Precision per query (M§6): ``100 * |top-R ∩ GT| / R`` with R = number of relevant items.

    Ranking sorts by descending score with a stable sort (ties: lower gallery index first).

    Args:
        sims: [Q, G] float scores, larger = more similar.
        relevance: [Q, G] bool (or 0/1), True where gallery item g is a ground-truth positive of query q.

    Returns:
        [Q] float64 percent; NaN for queries with R = 0 (skipped by the means).
    """
    return _precision_at_r(sims, relevance, block_size)[0]


def map_at_r_per_query(
    sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> Tensor:
    """ECCV Caption mAP@R per query (M§6): ``100 * (1/R) Σ_{r<=R} P@r · [item r relevant]``.

    Same shapes, tie rule and R = 0 handling as `r_precision_per_query`.
    """
    return _precision_at_r(sims, relevance, block_size)[1]


def _nanmean_or_raise(values: Tensor) -> float:
    valid = ~torch.isnan(values)
    if not bool(valid.any()):
        raise ValueError("no query has a relevant item (R = 0 for all queries)")
    return values[valid].mean().item()


def r_precision(
    sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> float:
    """Mean R-Precision in percent over queries with at least one relevant item (M§6, ECCV Caption)."""
    return _nanmean_or_raise(r_precision_per_query(sims, relevance, block_size))


def map_at_r(sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> float:
    """Mean mAP@R in percent over queries with at least one relevant item (M§6, ECCV Caption)."""
    return _nanmean_or_raise(map_at_r_per_query(sims, relevance, block_size))


class RetrievalPrecisionAccumulator:
    """Streaming R-Precision / mAP@R: feed query blocks ``update(sims [b, G], relevance [b, G])``, then `compute`.

    The result equals `r_precision` / `map_at_r` on the concatenated blocks (queries with R = 0 are skipped).
    """

    def __init__(self) -> None:
        self._rp: list[Tensor] = []
        self._ap: list[Tensor] = []

    def update(self, sims: Tensor | np.ndarray, relevance: Tensor | np.ndarray) -> None:
        rp, ap = _precision_at_r(sims, relevance, DEFAULT_BLOCK_SIZE)
        self._rp.append(rp)
        self._ap.append(ap)

    def compute(self) -> dict[str, float]:
        """``{"r_precision": ..., "map_at_r": ...}`` in percent."""
        if not self._rp:
            raise ValueError("no query blocks were given")
        dev = self._rp[0].device
        rp = torch.cat([t.to(dev) for t in self._rp])
        ap = torch.cat([t.to(dev) for t in self._ap])
        return {"r_precision": _nanmean_or_raise(rp), "map_at_r": _nanmean_or_raise(ap)}


# --------------------------------------------------------------------------------------------------------------------
# Circular variance (Table 3)


def circular_variance(sets: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None) -> Tensor:
    """Circular variance of each set (DivE Table 3, M§6): ``1 − ‖(1/|S|) Σ_{x∈S} x / ‖x‖‖₂``.

    Elements are L2-normalised first, so the value is invariant to element scale: 0 when all elements point the same
    way, 1 when they cancel (e.g. an antipodal pair). Rounding is clamped into [0, 1]. An all-zero element normalises to
    the zero vector (it shrinks the mean); avoid it.

    Args:
        sets: [N, K, D] float.
        mask: [N, K] bool, True = valid element; None = all valid.

    Returns:
        [N] float (float32 or wider) on the input's device.

    Raises:
        ValueError: wrong ranks/shapes, NaN, or a set with no valid element.
    """
    x = _as_tensor(sets)
    if x.dim() != 3:
        raise ValueError(f"sets: expected [N, K, D], got shape {list(x.shape)}")
    N, K, D = x.shape
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if torch.isnan(x).any():
        raise ValueError("sets contains NaN")
    if mask is None:
        m = torch.ones(N, K, dtype=x.dtype, device=x.device)
    else:
        mb = torch.as_tensor(mask, device=x.device)
        if tuple(mb.shape) != (N, K):
            raise ValueError(f"mask: expected shape [{N}, {K}], got {list(mb.shape)}")
        m = mb.bool().to(x.dtype)
    count = m.sum(dim=1)  # [N]
    if bool((count == 0).any()):
        raise ValueError("every set needs at least one valid element (mask has an all-False row)")
    unit = F.normalize(x, dim=-1)  # [N, K, D]
    mean = (unit * m[..., None]).sum(dim=1) / count[:, None]  # [N, D]
    return (1.0 - torch.linalg.vector_norm(mean, dim=-1)).clamp(0.0, 1.0)


def log_mean_circular_variance(sets: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None) -> float:
    """``ln`` of the dataset-average circular variance (DivE Table 3 reports e.g. −2.13 vs −2.27); −inf if it is 0."""
    return torch.log(circular_variance(sets, mask).double().mean()).item()
