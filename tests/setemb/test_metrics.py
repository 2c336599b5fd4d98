"""Tests for setemb.metrics: recall@K (dense, five-fold, streaming), R-Precision / mAP@R, circular variance."""

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.metrics import (
    RECALL_KEYS,
    RankAccumulator,
    RetrievalPrecisionAccumulator,
    circular_variance,
    five_fold_1k,
    log_mean_circular_variance,
    map_at_r,
    map_at_r_per_query,
    positive_pair_scores,
    r_precision,
    r_precision_per_query,
    recall_at_k,
    recall_at_k_streaming,
    retrieval_ranks,
)

# ---------------------------------------------------------------------------------------------------------------------
# naive references


def naive_ranks(sims: np.ndarray, cpi: int) -> tuple[list[int], list[int]]:
    """1-based ranks by python loops: count wrong items strictly above the (best) positive."""
    n_images, n_captions = sims.shape
    i2t = []
    for i in range(n_images):
        own = range(cpi * i, cpi * i + cpi)
        best = max(sims[i, c] for c in own)
        i2t.append(1 + sum(1 for c in range(n_captions) if c not in own and sims[i, c] > best))
    t2i = []
    for c in range(n_captions):
        g = c // cpi
        t2i.append(1 + sum(1 for i in range(n_images) if i != g and sims[i, c] > sims[g, c]))
    return i2t, t2i


def naive_metrics(sims: np.ndarray, cpi: int) -> dict[str, float]:
    """VSE++ convention with 0-based ranks: R@K = 100 mean[rank0 < K], MedR = floor(median(rank0)) + 1."""
    out = {}
    for name, ranks in zip(("i2t", "t2i"), naive_ranks(sims, cpi), strict=True):
        r0 = np.array(ranks) - 1
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r0 < k)
        out[f"{name}_medr"] = np.floor(np.median(r0)) + 1
        out[f"{name}_meanr"] = r0.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def naive_precision(scores: list[float], rel: list[bool]) -> tuple[float, float] | None:
    order = sorted(range(len(scores)), key=lambda g: (-scores[g], g))
    R = sum(rel)
    if R == 0:
        return None
    hits, ap = 0, 0.0
    for r, g in enumerate(order[:R], start=1):
        if rel[g]:
            hits += 1
            ap += hits / r
    return 100.0 * hits / R, 100.0 * ap / R


def assert_dicts_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert list(a) == list(RECALL_KEYS)
    for key in RECALL_KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


def identity_sims(n_images: int, cpi: int) -> torch.Tensor:
    return torch.eye(n_images, dtype=torch.float64).repeat_interleave(cpi, dim=1)  # [n, cpi * n]


# ---------------------------------------------------------------------------------------------------------------------
# recall@K on hand-built matrices

TIE_SIMS = np.array(
    [
        [1.0, 1.0, 0.0],  # image 0: positive ties with caption 1 -> rank 1
        [2.0, 1.0, 0.5],  # image 1: caption 0 strictly above the positive -> rank 2
        [0.0, 0.0, 0.0],  # image 2: all ties -> rank 1
    ]
)


def test_ties_favour_query_and_strictly_greater_hurts():
    i2t, t2i = retrieval_ranks(TIE_SIMS, captions_per_image=1)
    assert i2t.tolist() == [1, 2, 1]
    # caption 0: image 1 scores 2.0 > 1.0; caption 1: image 0 ties 1.0; caption 2: image 1 scores 0.5 > 0.0
    assert t2i.tolist() == [2, 1, 2]
    m = recall_at_k(TIE_SIMS, captions_per_image=1)
    assert m["i2t_r1"] == pytest.approx(200 / 3)
    assert m["i2t_r5"] == 100.0 and m["i2t_r10"] == 100.0
    assert m["i2t_medr"] == 1.0 and m["i2t_meanr"] == pytest.approx(4 / 3)
    assert m["t2i_r1"] == pytest.approx(100 / 3)
    assert m["t2i_medr"] == 2.0 and m["t2i_meanr"] == pytest.approx(5 / 3)
    assert m["rsum"] == pytest.approx(500.0)
    assert_dicts_close(m, naive_metrics(TIE_SIMS, 1))


def test_i2t_is_best_of_five_and_other_positives_never_count():
    cpi, n = 5, 3
    sims = np.full((n, cpi * n), 0.5)
    sims[0, :5] = [0.1, 0.2, 0.3, 0.9, 0.0]  # best own caption is #3 at 0.9; the others sit below wrong items
    sims[0, 7] = 0.95  # one wrong caption strictly above -> counts
    sims[0, 12] = 0.9  # one wrong caption tying the best positive -> does not count
    sims[1] = -1.0
    sims[1, 5:10] = [0.0, 0.0, 0.0, 0.0, 0.0]  # five tied positives above all wrong captions -> rank 1
    sims[2] = 0.0
    sims[2, 10:] = [0.7, 0.8, 0.6, 0.9, 0.2]
    sims[2, 0] = 0.85  # a wrong caption above four positives but below the best one (0.9) -> rank 1
    i2t, _ = retrieval_ranks(sims, captions_per_image=cpi)
    assert i2t.tolist() == [2, 1, 1]
    assert_dicts_close(recall_at_k(sims, cpi), naive_metrics(sims, cpi))


def ranked_sims(ranks: list[int]) -> np.ndarray:
    """cpi = 1 matrix whose i2t rank of image i is ranks[i]: rank - 1 wrong captions score 1, the positive 0."""
    n = len(ranks)
    sims = np.full((n, n), -1.0)
    for i, r in enumerate(ranks):
        sims[i, i] = 0.0
        wrong = [c for c in range(n) if c != i][: r - 1]
        sims[i, wrong] = 1.0
    return sims


@pytest.mark.parametrize(
    ("ranks", "medr", "meanr", "r1", "r5"),
    [
        ([5, 1, 3, 2, 4], 3.0, 3.0, 20.0, 100.0),  # odd count: the middle rank
        ([1, 3, 4, 2], 2.0, 2.5, 25.0, 100.0),  # even: median 2.5 -> floor 2 (0-based 1.5 -> 1, +1)
        ([1, 2, 3, 4, 10, 1, 1, 1, 1, 2], 1.0, 2.6, 50.0, 90.0),  # median 1.5 -> 1
        ([2, 2, 2, 3], 2.0, 2.25, 0.0, 100.0),
    ],
)
def test_medr_meanr_conventions(ranks, medr, meanr, r1, r5):
    sims = ranked_sims(ranks)
    i2t, _ = retrieval_ranks(sims, captions_per_image=1)
    assert i2t.tolist() == ranks
    m = recall_at_k(sims, captions_per_image=1)
    assert m["i2t_medr"] == medr
    assert m["i2t_meanr"] == pytest.approx(meanr)
    assert m["i2t_r1"] == pytest.approx(r1) and m["i2t_r5"] == pytest.approx(r5)
    assert_dicts_close(m, naive_metrics(sims, 1))


def test_perfect_retrieval_gives_100_and_rsum_600():
    m = recall_at_k(identity_sims(12, 5), captions_per_image=5)
    for key in RECALL_KEYS:
        if key.endswith(("_r1", "_r5", "_r10")):
            assert m[key] == 100.0
    assert m["rsum"] == 600.0
    assert m["i2t_medr"] == m["t2i_medr"] == m["i2t_meanr"] == m["t2i_meanr"] == 1.0


def test_reversed_retrieval_is_worst():
    n, cpi = 20, 5
    m = recall_at_k(-identity_sims(n, cpi), captions_per_image=cpi)
    assert m["rsum"] == 0.0
    assert m["i2t_medr"] == m["i2t_meanr"] == cpi * (n - 1) + 1  # every wrong caption is strictly above
    assert m["t2i_medr"] == m["t2i_meanr"] == n


@st.composite
def sims_with_ties(draw):
    n_images = draw(st.integers(1, 7))
    cpi = draw(st.integers(1, 4))
    values = draw(st.lists(st.integers(0, 3), min_size=n_images * cpi * n_images, max_size=n_images * cpi * n_images))
    return np.array(values, dtype=np.float32).reshape(n_images, cpi * n_images), cpi


@settings(max_examples=40, deadline=None)
@given(sims_with_ties(), st.integers(1, 5))
def test_recall_matches_naive_and_numpy_equals_torch(case, block_size):
    sims, cpi = case
    dense = recall_at_k(sims, cpi, block_size=block_size)
    assert_dicts_close(dense, naive_metrics(sims, cpi))
    assert recall_at_k(torch.from_numpy(sims), cpi) == recall_at_k(sims, cpi)


def test_numpy_and_torch_inputs_give_identical_dicts():
    sims = np.random.default_rng(0).normal(size=(9, 27))
    assert recall_at_k(sims, 3) == recall_at_k(torch.from_numpy(sims), 3)
    assert recall_at_k(sims.astype(np.float32), 3) == recall_at_k(torch.from_numpy(sims.astype(np.float32)), 3)


@pytest.mark.parametrize(
    ("shape", "cpi"),
    [((3, 14), 5), ((3, 3), 5), ((15,), 5), ((2, 3, 5), 1), ((0, 0), 5), ((3, 3), 0)],
)
def test_bad_shapes_raise(shape, cpi):
    with pytest.raises(ValueError):
        recall_at_k(np.zeros(shape), cpi)


def test_nan_raises():
    sims = np.zeros((4, 8))
    sims[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(sims, 2)
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.from_numpy(sims), 2, block_size=3)


# ---------------------------------------------------------------------------------------------------------------------
# five-fold 1K


def folded_sims(n_folds: int, fold_images: int, cpi: int, seed: int = 0) -> np.ndarray:
    """Block-diagonal folds of random scores in [0, 1) plus cross-fold distractors at 10 (above every in-fold score)."""
    rng = np.random.default_rng(seed)
    n = n_folds * fold_images
    sims = np.full((n, cpi * n), 10.0)
    for f in range(n_folds):
        i0, c0 = f * fold_images, f * fold_images * cpi
        sims[i0 : i0 + fold_images, c0 : c0 + cpi * fold_images] = rng.random((fold_images, cpi * fold_images))
    return sims


def test_five_fold_ranks_inside_folds_only():
    n_folds, fold_images, cpi = 5, 6, 2
    sims = folded_sims(n_folds, fold_images, cpi)
    per_fold = []
    for f in range(n_folds):
        i0, c0 = f * fold_images, f * fold_images * cpi
        per_fold.append(recall_at_k(sims[i0 : i0 + fold_images, c0 : c0 + cpi * fold_images], cpi))
    expected = {key: float(np.mean([m[key] for m in per_fold])) for key in RECALL_KEYS}
    got = five_fold_1k(sims, cpi, n_folds=n_folds, fold_images=fold_images)
    assert_dicts_close(got, expected)
    assert got["rsum"] == pytest.approx(np.mean([m["rsum"] for m in per_fold]))
    # the distractors would wreck a ranking over the whole matrix
    assert recall_at_k(sims, cpi)["rsum"] == 0.0 and got["rsum"] > 100.0


@pytest.mark.parametrize("block_size", [None, 1, 4, 6, 50])
def test_five_fold_scorer_equals_matrix_and_sees_only_folds(block_size):
    n_folds, fold_images, cpi = 5, 6, 2
    sims = folded_sims(n_folds, fold_images, cpi, seed=1)
    calls = []

    def scorer(img: slice, cap: slice) -> torch.Tensor:
        fold = img.start // fold_images
        assert (img.stop - 1) // fold_images == fold
        assert fold * fold_images * cpi <= cap.start and cap.stop <= (fold + 1) * fold_images * cpi
        calls.append((img, cap))
        return torch.from_numpy(sims[img, cap])

    got = five_fold_1k(scorer, cpi, n_folds=n_folds, fold_images=fold_images, block_size=block_size)
    assert got == five_fold_1k(sims, cpi, n_folds=n_folds, fold_images=fold_images)
    assert max(c[0].stop - c[0].start for c in calls) <= fold_images


def test_five_fold_bad_shape_raises():
    with pytest.raises(ValueError):
        five_fold_1k(np.zeros((20, 100)), 5, n_folds=5, fold_images=5)  # needs [25, 125]
    with pytest.raises(ValueError):
        five_fold_1k(lambda i, c: np.zeros((3, 3)), 5, n_folds=5, fold_images=4)


# ---------------------------------------------------------------------------------------------------------------------
# streaming 5K


@pytest.mark.parametrize("block_size", [1, 3, 4, 5, 13, 100])
def test_streaming_equals_dense_with_uneven_blocks(block_size):
    n, cpi = 13, 3
    sims = np.random.default_rng(2).integers(0, 4, size=(n, cpi * n)).astype(np.float32)  # many ties
    calls = []

    def scorer(img: slice, cap: slice) -> np.ndarray:
        calls.append(img.stop - img.start)
        return sims[img, cap]

    got = recall_at_k_streaming(scorer, n, cpi * n, cpi, block_size=block_size)
    assert_dicts_close(got, recall_at_k(sims, cpi))
    assert max(calls) <= block_size


def test_accumulator_out_of_order_uneven_blocks():
    n, cpi = 11, 2
    sims = torch.randint(0, 3, (n, cpi * n)).double()
    pos = positive_pair_scores(lambda i, c: sims[i, c], n, cpi, block_size=4)
    assert torch.equal(pos, sims[torch.arange(cpi * n) // cpi, torch.arange(cpi * n)])
    acc = RankAccumulator(n, pos, cpi)
    for start, stop in [(7, 11), (0, 1), (3, 7), (1, 3)]:
        acc.update(start, sims[start:stop])
    assert_dicts_close(acc.compute(), recall_at_k(sims, cpi))
    ref_i2t, ref_t2i = retrieval_ranks(sims, cpi)
    i2t, t2i = acc.ranks()
    assert torch.equal(i2t, ref_i2t) and torch.equal(t2i, ref_t2i)


def test_accumulator_rejects_missing_overlapping_and_misshaped_blocks():
    n, cpi = 4, 2
    sims = torch.rand(n, cpi * n)
    acc = RankAccumulator(n, sims[torch.arange(cpi * n) // cpi, torch.arange(cpi * n)], cpi)
    acc.update(0, sims[:2])
    with pytest.raises(ValueError, match="overlap"):
        acc.update(1, sims[1:3])
    with pytest.raises(ValueError):
        acc.update(2, sims[2:, :5])
    with pytest.raises(ValueError):
        acc.update(3, sims[2:])
    with pytest.raises(ValueError, match="never consumed"):
        acc.compute()
    with pytest.raises(ValueError):
        RankAccumulator(n, torch.zeros(cpi * n + 1), cpi)


def test_accumulator_excludes_own_image_and_warns_on_positive_mismatch(caplog):
    sims = torch.tensor([[0.5, 0.4], [0.6, 0.7]])  # cpi = 1
    acc = RankAccumulator(2, torch.tensor([0.0, 0.0]), captions_per_image=1)  # positives deliberately too low
    acc.update(0, sims)
    with caplog.at_level(logging.WARNING, logger="setemb.metrics"):
        _, t2i = acc.ranks()
    # caption 0: image 1 (0.6) > 0.0 counts, image 0 (its own) never counts, whatever the value
    assert t2i.tolist() == [2, 2]
    assert "differ from positive_scores" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# R-Precision and mAP@R


@pytest.mark.parametrize(
    ("scores", "rel", "rp", "ap"),
    [
        ([3.0, 2.0, 1.0], [1, 0, 1], 50.0, 50.0),  # top-2 = {0, 1}; AP = (P@1 * 1 + P@2 * 0) / 2
        ([3.0, 2.0, 1.0], [0, 1, 1], 50.0, 25.0),  # AP = (0 + P@2 = 1/2) / 2
        ([1.0, 2.0, 3.0], [0, 1, 1], 100.0, 100.0),
        ([1.0, 1.0, 1.0], [0, 1, 0], 0.0, 0.0),  # tie: the lower index (0) ranks first
        ([1.0, 1.0, 1.0], [1, 0, 0], 100.0, 100.0),
        ([0.0, 5.0, 4.0, 3.0, 9.0], [1, 0, 1, 1, 0], 100 / 3, 100 / 9),  # ranked 4,1,2,3,0; AP = (0+0+1/3)/3
    ],
)
def test_precision_hand_cases(scores, rel, rp, ap):
    sims, relevance = np.array([scores]), np.array([rel], dtype=bool)
    assert r_precision(sims, relevance) == pytest.approx(rp)
    assert map_at_r(sims, relevance) == pytest.approx(ap)


def test_queries_without_relevant_items_are_skipped():
    sims = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    relevance = torch.tensor([[True, False, True], [False, False, False]])
    assert torch.isnan(r_precision_per_query(sims, relevance)[1])
    assert r_precision(sims, relevance) == pytest.approx(50.0)
    assert map_at_r(sims, relevance) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="R = 0"):
        r_precision(sims, torch.zeros(2, 3, dtype=torch.bool))


@st.composite
def precision_cases(draw):
    Q, G = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    scores = draw(st.lists(st.integers(0, 3), min_size=Q * G, max_size=Q * G))
    rel = draw(st.lists(st.booleans(), min_size=Q * G, max_size=Q * G))
    return np.array(scores, dtype=np.float64).reshape(Q, G), np.array(rel).reshape(Q, G)


@settings(max_examples=50, deadline=None)
@given(precision_cases(), st.integers(1, 4))
def test_precision_matches_naive(case, block_size):
    sims, rel = case
    naive = [naive_precision(list(s), list(r)) for s, r in zip(sims, rel, strict=True)]
    rp = r_precision_per_query(sims, rel, block_size=block_size)
    ap = map_at_r_per_query(torch.from_numpy(sims), torch.from_numpy(rel), block_size=block_size)
    for q, ref in enumerate(naive):
        if ref is None:
            assert torch.isnan(rp[q]) and torch.isnan(ap[q])
        else:
            assert rp[q].item() == pytest.approx(ref[0]) and ap[q].item() == pytest.approx(ref[1])
    valid = [ref for ref in naive if ref is not None]
    if valid:
        assert r_precision(sims, rel) == pytest.approx(np.mean([v[0] for v in valid]))
        assert map_at_r(sims, rel) == pytest.approx(np.mean([v[1] for v in valid]))
        acc = RetrievalPrecisionAccumulator()
        for start in range(0, sims.shape[0], block_size):
            acc.update(sims[start : start + block_size], rel[start : start + block_size])
        out = acc.compute()
        assert out["r_precision"] == pytest.approx(r_precision(sims, rel))
        assert out["map_at_r"] == pytest.approx(map_at_r(sims, rel))


def test_precision_bad_inputs_raise():
    with pytest.raises(ValueError):
        r_precision(np.zeros((2, 3)), np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError):
        map_at_r(np.zeros(3), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        map_at_r(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError):
        RetrievalPrecisionAccumulator().compute()


# ---------------------------------------------------------------------------------------------------------------------
# circular variance


def test_circular_variance_known_values():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, generator=g)
    scales = torch.tensor([0.5, 1.0, 3.0, 100.0])[:, None]
    identical = v[None] * scales  # same direction, different norms -> 0
    antipodal = torch.stack([v, -2.0 * v, v, -v])  # two antipodal pairs -> 1
    e = torch.eye(8)
    orthogonal = torch.stack([e[0], e[1], e[0], e[1]])  # mean (e0 + e1) / 2 -> 1 - sqrt(2) / 2
    cv = circular_variance(torch.stack([identical, antipodal, orthogonal]))
    assert cv.shape == (3,)
    torch.testing.assert_close(cv, torch.tensor([0.0, 1.0, 1 - math.sqrt(2) / 2]), atol=1e-6, rtol=0)
    expected_log = math.log((0.0 + 1.0 + 1 - math.sqrt(2) / 2) / 3)
    assert log_mean_circular_variance(torch.stack([identical, antipodal, orthogonal])) == pytest.approx(expected_log)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**16))
def test_circular_variance_scale_invariant_and_mask(N, K, D, seed):
    g = torch.Generator().manual_seed(seed)
    sets = torch.randn(N, K, D, generator=g, dtype=torch.float64)
    scales = torch.rand(N, K, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    cv = circular_variance(sets)
    torch.testing.assert_close(circular_variance(sets * scales), cv)
    assert bool(((cv >= 0) & (cv <= 1)).all())
    # a masked set equals the set with the masked elements removed
    junk = torch.randn(N, 2, D, generator=g, dtype=torch.float64)
    mask = torch.cat([torch.ones(N, K, dtype=torch.bool), torch.zeros(N, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(circular_variance(torch.cat([sets, junk], dim=1), mask), cv)
    torch.testing.assert_close(circular_variance(sets.numpy()), cv)


def test_circular_variance_bad_inputs_raise():
    with pytest.raises(ValueError):
        circular_variance(torch.zeros(3, 4))
    with pytest.raises(ValueError):
        circular_variance(torch.ones(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid element"):
        circular_variance(torch.ones(2, 3, 4), mask=torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        circular_variance(torch.full((1, 2, 3), float("nan")))
