"""Tests of setemb.similarity: each similarity against a naive dense reference, DivE eq. 6-8 properties, masks,
numerics (alpha = 1e4, bf16/fp16), MaxMatch assignment vs scipy, and tiled `score` (+ top-k) vs the dense matrix."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from setemb.similarity import (
    chamfer,
    closed_form_sampled_distance,
    create_similarity,
    csd_similarity,
    list_similarities,
    match_probability,
    max_similarity,
    mean_similarity,
    pair_assignment,
    score,
    sinkhorn,
    smooth_chamfer,
)
from setemb.similarity.kernels import _smooth_chamfer_pool

ALL = ["chamfer", "match_probability", "max_similarity", "mean_similarity", "pair_assignment", "smooth_chamfer"]
COSINE_BASED = [n for n in ALL if n != "match_probability"]
# `csd` (PCME++) compares (μ, σ) pairs [N, 2, D], not sets: its own tests are at the end of this file.
KWARGS = {"match_probability": {"scale": 2.0, "shift": 1.0}}  # non-trivial values
HYPOTHESIS = settings(max_examples=20, deadline=None)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@st.composite
def sets_BKD(draw, max_sets: int = 4, max_k: int = 5, width: int | None = None) -> torch.Tensor:
    """A batch of sets [B, K, D] of standard normal elements."""
    B = draw(st.integers(1, max_sets))
    K = draw(st.integers(1, max_k))
    D = width or draw(st.integers(2, 6))
    return _randn(B, K, D, seed=draw(st.integers(0, 2**31 - 1)))


@st.composite
def pairs_BKD_GLD(draw, max_k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of sets a [B, K, D], b [G, L, D] sharing D (K and L differ)."""
    D = draw(st.integers(2, 6))
    return draw(sets_BKD(max_k=max_k, width=D)), draw(sets_BKD(max_k=max_k, width=D))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Naive element cosines [N, M, Ka, Kb] in float64."""
    return torch.einsum("nkd,mld->nmkl", F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1))


def _naive(name: str, a: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
    """Dense float64 reference [N, M] straight from the definitions (M§3)."""
    c = _cos(a, b)  # [N, M, Ka, Kb]
    if name == "smooth_chamfer":
        t = kw.get("alpha", 16.0)
        return (torch.logsumexp(t * c, 3).mean(2) + torch.logsumexp(t * c, 2).mean(2)) / (2 * t)
    if name == "chamfer":
        return 0.5 * (c.amax(3).mean(2) + c.amax(2).mean(2))
    if name == "max_similarity":
        return c.amax(dim=(2, 3))
    if name == "mean_similarity":
        return c.mean(dim=(2, 3))
    if name == "match_probability":
        d = torch.cdist(a.double()[:, None], b.double()[None])  # [N, M, Ka, Kb]
        return torch.sigmoid(kw["shift"] - kw["scale"] * d).mean(dim=(2, 3))
    assert name == "pair_assignment"
    out = torch.empty(c.shape[:2], dtype=torch.float64)
    for i, j in itertools.product(range(c.shape[0]), range(c.shape[1])):
        m = c[i, j].numpy()
        rows, cols = linear_sum_assignment(m, maximize=True)
        out[i, j] = m[rows, cols].sum() / min(m.shape)
    return out


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_every_similarity():
    assert list_similarities() == sorted([*ALL, "csd"])


def test_create_similarity_binds_kwargs_and_rejects_unknown():
    a, b = _randn(3, 4, 8, seed=1), _randn(5, 2, 8, seed=2)
    assert torch.allclose(create_similarity("smooth_chamfer", alpha=4.0)(a, b), smooth_chamfer(a, b, alpha=4.0))
    assert torch.equal(create_similarity("smooth_chamfer", alpha=None)(a, b), smooth_chamfer(a, b))  # None -> default
    with pytest.raises(ValueError, match="unknown kwargs \\['temperature'\\]"):
        create_similarity("smooth_chamfer", temperature=4.0)
    with pytest.raises(ValueError, match="known: .*smooth_chamfer"):
        create_similarity("smooth_chamfr")
    with pytest.raises(ValueError, match="alpha must be > 0, got 0"):
        smooth_chamfer(a, b, alpha=0.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        create_similarity("pair_assignment", tau=-1.0)


@pytest.mark.parametrize("name", ALL)
def test_every_similarity_matches_dense_reference_and_has_gradients(name):
    a = _randn(3, 4, 8, seed=1).requires_grad_()
    b = _randn(5, 3, 8, seed=2).requires_grad_()
    fn = create_similarity(name, **KWARGS.get(name, {}))
    with torch.no_grad():
        s = fn(a, b)
    assert s.shape == (3, 5) and s.dtype == torch.float32
    assert torch.allclose(s.double(), _naive(name, a.detach(), b.detach(), **KWARGS.get(name, {})), atol=1e-5)
    fn(a, b).sum().backward()  # pair_assignment: Sinkhorn path under autograd
    for x in (a, b):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ DivE eq. 6-8


@HYPOTHESIS
@given(pairs_BKD_GLD(), st.floats(0.5, 64.0))
def test_mean_le_chamfer_le_max_and_smooth_chamfer_bounds(pair, alpha):
    a, b = pair
    mean, ch, mx = mean_similarity(a, b), chamfer(a, b), max_similarity(a, b)
    sc = smooth_chamfer(a, b, alpha=alpha)
    eps = 1e-5
    assert (mean <= ch + eps).all() and (ch <= mx + eps).all()
    log_k = math.log(max(a.shape[1], b.shape[1]))
    assert (ch <= sc + eps).all() and (sc <= ch + log_k / alpha + eps).all()


def test_smooth_chamfer_tends_to_chamfer_as_alpha_grows():
    a = _randn(4, 4, 16, seed=3).requires_grad_()
    b = _randn(6, 3, 16, seed=4).requires_grad_()
    sc = smooth_chamfer(a, b, alpha=1e4)
    assert torch.isfinite(sc).all()
    assert torch.allclose(sc, chamfer(a, b), atol=math.log(4) / 1e4 + 1e-6)
    sc.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_smooth_chamfer_small_alpha_limit_is_mean_of_all_pairs():
    # LSE_j(αC_ij)/α = log(Kb)/α + mean_j C_ij + O(α), so s − (log Ka + log Kb)/(2α) → mean_ij C_ij as α → 0.
    a, b = _randn(3, 4, 8, seed=5, dtype=torch.float64), _randn(5, 3, 8, seed=6, dtype=torch.float64)
    alpha = 1e-4
    limit = smooth_chamfer(a, b, alpha=alpha) - (math.log(4) + math.log(3)) / (2 * alpha)
    assert torch.allclose(limit, mean_similarity(a, b), atol=1e-4)
    assert not torch.allclose(smooth_chamfer(a, b, alpha=1.0) - math.log(12) / 2, mean_similarity(a, b), atol=1e-4)


def test_smooth_chamfer_gradient_wrt_cosine_is_eq8():
    c = torch.rand(3, 4, 5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    c.requires_grad_()  # [N, Ka, Kb, M]
    alpha = 7.0
    _smooth_chamfer_pool(c, alpha).sum().backward()
    Ka, Kb = c.shape[1], c.shape[2]
    expected = torch.softmax(alpha * c, dim=2) / (2 * Ka) + torch.softmax(alpha * c, dim=1) / (2 * Kb)
    assert torch.allclose(c.grad, expected.detach(), atol=1e-12)


def test_smooth_chamfer_pool_is_what_smooth_chamfer_computes():
    a, b = _randn(3, 4, 8, seed=7), _randn(2, 5, 8, seed=8)
    c = torch.einsum("nkd,mld->nklm", F.normalize(a, dim=-1), F.normalize(b, dim=-1))  # [N, Ka, Kb, M]
    assert torch.allclose(smooth_chamfer(a, b, alpha=5.0), _smooth_chamfer_pool(c, 5.0), atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 16.0, 64.0, 64.5, 300.0])
def test_fast_path_equals_stable_path(alpha):
    # Without autograd and alpha <= 64 smooth_chamfer exponentiates in place; with autograd it uses logsumexp.
    a, b = _randn(4, 4, 16, seed=9), _randn(6, 3, 16, seed=10)
    a_mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    b_mask = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    b_mask[:, 0] = True
    for kw in ({}, {"a_mask": a_mask, "b_mask": b_mask}):
        fast = smooth_chamfer(a, b, alpha=alpha, **kw)
        stable = smooth_chamfer(a.clone().requires_grad_(), b, alpha=alpha, **kw)
        assert torch.isfinite(fast).all()
        assert torch.allclose(fast, stable.detach(), atol=1e-6, rtol=1e-6)
        assert torch.allclose(fast.double(), smooth_chamfer(a.double(), b.double(), alpha=alpha, **kw), atol=1e-6)


@pytest.mark.parametrize("name", COSINE_BASED)
def test_symmetry(name):
    a, b = _randn(3, 4, 8, seed=11), _randn(5, 2, 8, seed=12)
    fn = create_similarity(name, exact=True) if name == "pair_assignment" else create_similarity(name)
    assert torch.allclose(fn(a, b), fn(b, a).T, atol=1e-6)


def test_match_probability_symmetry():
    a, b = _randn(3, 4, 8, seed=11), _randn(5, 2, 8, seed=12)
    assert torch.allclose(match_probability(a, b, scale=3.0), match_probability(b, a, scale=3.0).T, atol=1e-6)


@HYPOTHESIS
@given(pairs_BKD_GLD(), st.sampled_from(ALL), st.randoms(use_true_random=False))
def test_permutation_invariance_inside_sets(pair, name, rng):
    a, b = pair
    pa, pb = list(range(a.shape[1])), list(range(b.shape[1]))
    rng.shuffle(pa)
    rng.shuffle(pb)
    fn = create_similarity(name, **KWARGS.get(name, {}))
    assert torch.allclose(fn(a, b), fn(a[:, pa], b[:, pb]), atol=1e-5)


@pytest.mark.parametrize("name", COSINE_BASED)
def test_single_element_sets_give_cosine(name):
    a, b = _randn(4, 1, 8, seed=13), _randn(3, 1, 8, seed=14)
    cosine = F.normalize(a[:, 0], dim=-1) @ F.normalize(b[:, 0], dim=-1).T  # [N, M]
    assert torch.allclose(create_similarity(name)(a, b), cosine, atol=1e-6)


@HYPOTHESIS
@given(pairs_BKD_GLD(), st.sampled_from(COSINE_BASED), st.floats(1e-2, 1e2))
def test_scale_invariance(pair, name, factor):
    a, b = pair
    fn = create_similarity(name)
    assert torch.allclose(fn(a * factor, b), fn(a, b), atol=1e-5)


def test_one_element_against_many():
    a, b = _randn(2, 1, 8, seed=15), _randn(3, 5, 8, seed=16)
    for name in ALL:
        kw = KWARGS.get(name, {})
        assert torch.allclose(create_similarity(name, **kw)(a, b).double(), _naive(name, a, b, **kw), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [16.0, 1e4])
def test_half_precision_inputs_compute_in_float32(dtype, alpha):
    a = _randn(3, 4, 32, seed=17, dtype=dtype).requires_grad_()
    b = _randn(5, 4, 32, seed=18, dtype=dtype)
    s = smooth_chamfer(a, b, alpha=alpha)
    assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.allclose(s, smooth_chamfer(a.detach().float(), b.float(), alpha=alpha), atol=1e-6)
    s.sum().backward()
    assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()


def test_no_overflow_at_large_alpha_with_near_identical_elements():
    a = _randn(2, 4, 8, seed=19) * 1e3
    b = a[:, [3, 2, 1, 0]] + 1e-4  # cosines ~ 1
    for alpha in (64.0, 1e4):
        s = smooth_chamfer(a, b, alpha=alpha)
        assert torch.isfinite(s).all() and torch.allclose(s.diagonal(), torch.ones(2), atol=1e-5)


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("name", ALL)
def test_padded_sets_equal_unpadded_sets(name):
    kw = KWARGS.get(name, {})
    fn = create_similarity(name, **kw)
    sizes_a, sizes_b = [1, 3, 4], [2, 4, 1, 3]
    a_list = [_randn(1, k, 8, seed=20 + i) for i, k in enumerate(sizes_a)]
    b_list = [_randn(1, k, 8, seed=30 + i) for i, k in enumerate(sizes_b)]
    a_pad, b_pad = _randn(3, 4, 8, seed=40) * 5, _randn(4, 4, 8, seed=41) * 5  # garbage in padded slots
    a_mask, b_mask = torch.zeros(3, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool)
    for i, x in enumerate(a_list):
        a_pad[i, : x.shape[1]], a_mask[i, : x.shape[1]] = x[0], True
    for j, y in enumerate(b_list):
        b_pad[j, : y.shape[1]], b_mask[j, : y.shape[1]] = y[0], True
    expected = torch.tensor([[float(fn(x, y)) for y in b_list] for x in a_list])
    got = fn(a_pad, b_pad, a_mask=a_mask, b_mask=b_mask)
    assert torch.allclose(got, expected, atol=1e-5)
    got_grad = fn(a_pad.clone().requires_grad_(), b_pad, a_mask=a_mask, b_mask=b_mask).detach()
    assert torch.allclose(got_grad, expected, atol=1e-5) or name == "pair_assignment"  # Sinkhorn under autograd


@pytest.mark.parametrize("name", ALL)
def test_fully_masked_set_scores_minus_inf_with_finite_gradients(name):
    fn = create_similarity(name, **KWARGS.get(name, {}))
    a = _randn(3, 4, 8, seed=50).requires_grad_()
    b = _randn(2, 3, 8, seed=51).requires_grad_()
    a_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    b_mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    s = fn(a, b, a_mask=a_mask, b_mask=b_mask)
    finite = torch.tensor([[True, False], [False, False], [True, False]])
    assert torch.equal(torch.isfinite(s), finite)
    assert (s[~finite] == float("-inf")).all()
    with torch.no_grad():  # the no-autograd path (fast smooth_chamfer, exact pair_assignment) defines it the same way
        assert torch.equal(torch.isfinite(fn(a, b, a_mask=a_mask, b_mask=b_mask)), finite)
        if name != "pair_assignment":
            assert torch.allclose(fn(a, b, a_mask=a_mask, b_mask=b_mask), s.detach(), atol=1e-6)
    s[finite].sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert (a.grad[1] == 0).all() and (a.grad[0, 2:] == 0).all() and (b.grad[1] == 0).all()


def test_zero_length_sets_and_empty_batches():
    a, b = torch.randn(2, 0, 8), torch.randn(3, 2, 8)
    for name in ALL:
        fn = create_similarity(name)
        assert torch.equal(fn(a, b), torch.full((2, 3), float("-inf")))
        assert fn(torch.randn(0, 2, 8), b).shape == (0, 3)


def test_masked_gradient_is_eq8_over_valid_elements():
    c = torch.rand(1, 3, 4, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    c.requires_grad_()
    a_mask, b_mask = torch.tensor([[True, True, False]]), torch.tensor([[True, False, True, True]])
    alpha = 5.0
    _smooth_chamfer_pool(c, alpha, a_mask, b_mask).sum().backward()
    v = c.detach()[0, :2][:, [0, 2, 3], 0]  # [2, 3] valid block
    expected = torch.softmax(alpha * v, 1) / (2 * 2) + torch.softmax(alpha * v, 0) / (2 * 3)
    assert torch.allclose(c.grad[0, :2][:, [0, 2, 3], 0], expected, atol=1e-12)
    assert c.grad[0, 2].abs().sum() == 0 and c.grad[0, :, 1].abs().sum() == 0


# ------------------------------------------------------------------------------------------------ MaxMatch (M§3.3)


@HYPOTHESIS
@given(pairs_BKD_GLD(max_k=6))
def test_exact_pair_assignment_equals_scipy(pair):
    a, b = pair
    assert torch.allclose(pair_assignment(a, b, exact=True).double(), _naive("pair_assignment", a, b), atol=1e-5)


def test_exact_pair_assignment_large_sets_use_scipy_path():
    a, b = _randn(2, 7, 8, seed=60), _randn(3, 8, 8, seed=61)
    assert torch.allclose(pair_assignment(a, b, exact=True).double(), _naive("pair_assignment", a, b), atol=1e-5)


def test_exact_pair_assignment_masks_assign_min_valid_pairs():
    a, b = _randn(1, 4, 8, seed=62), _randn(1, 4, 8, seed=63)
    a_mask, b_mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool), torch.tensor([[0, 1, 1, 1]], dtype=torch.bool)
    got = pair_assignment(a, b, a_mask=a_mask, b_mask=b_mask, exact=True)
    assert torch.allclose(got.double(), _naive("pair_assignment", a[:, :3], b[:, 1:]), atol=1e-6)
    # all cosines negative: pairs must still be assigned (one-to-one over min(#valid) pairs), never skipped
    pos, neg = a.abs(), -b.abs()
    got = pair_assignment(pos, neg, a_mask=a_mask, b_mask=b_mask, exact=True)
    assert torch.allclose(got.double(), _naive("pair_assignment", pos[:, :3], neg[:, 1:]), atol=1e-6) and got < 0


def test_sinkhorn_converges_to_exact_assignment_as_tau_shrinks():
    a, b = _randn(3, 4, 16, seed=64), _randn(4, 4, 16, seed=65)  # continuous inputs: tie-free
    exact = pair_assignment(a, b, exact=True)
    errors = [
        (pair_assignment(a, b, exact=False, tau=tau, iterations=300) - exact).abs().max().item()
        for tau in (0.1, 0.03, 0.003)
    ]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3
    assert (pair_assignment(a, b, exact=False, tau=0.1) <= exact + 1e-6).all()  # a relaxation of a max: below it


def test_sinkhorn_plan_is_doubly_stochastic():
    z = _randn(5, 4, 4, seed=66)
    plan = sinkhorn(z, iterations=100)
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(-2), torch.ones(5, 4), atol=1e-6)
    assert torch.allclose(plan.sum(-1), torch.ones(5, 4), atol=1e-4)


def test_pair_assignment_default_is_exact_without_grad_and_sinkhorn_with_grad():
    a, b = _randn(2, 3, 8, seed=67), _randn(3, 3, 8, seed=68)
    assert torch.equal(pair_assignment(a, b), pair_assignment(a, b, exact=True))
    relaxed = pair_assignment(a.clone().requires_grad_(), b)
    assert relaxed.requires_grad
    assert torch.allclose(relaxed.detach(), pair_assignment(a, b, exact=False), atol=1e-7)


# ------------------------------------------------------------------------------------------------ PCME (M§3.2)


def test_match_probability_zero_scale_is_sigmoid_of_shift():
    a, b = _randn(3, 7, 8, seed=70), _randn(2, 7, 8, seed=71)
    assert torch.allclose(match_probability(a, b, scale=0.0, shift=0.7), torch.full((3, 2), 1 / (1 + math.exp(-0.7))))


def test_match_probability_doubled_scale_and_shift_is_pcme_sigma2():
    a, b = _randn(3, 7, 8, seed=72) * 0.3, _randn(2, 7, 8, seed=73) * 0.3
    pa, pb = 1.5, 0.5
    logit = -pa * torch.cdist(a[:, None], b[None]) + pb  # [N, M, J, J]
    sigma2 = (logit.exp() / (logit.exp() + (-logit).exp())).mean(dim=(2, 3))
    assert torch.allclose(match_probability(a, b, scale=2 * pa, shift=2 * pb), sigma2, atol=1e-6)


def test_match_probability_uses_raw_distances_and_learnt_tensors():
    a, b = _randn(2, 3, 4, seed=74), _randn(2, 3, 4, seed=75)
    assert not torch.allclose(match_probability(a, b), match_probability(2 * a, 2 * b))  # not scale invariant
    scale, shift = torch.tensor(3.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    match_probability(a, b, scale=scale, shift=shift).sum().backward()
    assert scale.grad < 0 and shift.grad > 0


# ------------------------------------------------------------------------------------------------ score (tiled)


def _masks(B: int, K: int, seed: int) -> torch.Tensor:
    mask = torch.rand(B, K, generator=torch.Generator().manual_seed(seed)) > 0.4
    mask[:, 0] = True
    return mask


@pytest.mark.parametrize("name", ALL)
def test_score_blockwise_equals_dense_value_and_gradient(name):
    kw = KWARGS.get(name, {})
    q, db = _randn(11, 4, 8, seed=80), _randn(7, 3, 8, seed=81)
    q_mask, db_mask = _masks(11, 4, 1), _masks(7, 3, 2)
    fn = create_similarity(name, **kw)
    dense = fn(q, db, a_mask=q_mask, b_mask=db_mask)
    tiled = score(q, db, name, query_mask=q_mask, database_mask=db_mask, block_size=(3, 4), **kw)
    assert tiled.shape == (11, 7) and tiled.dtype == torch.float32
    assert torch.allclose(tiled, dense, atol=1e-6)
    assert torch.allclose(score(q, db, fn, block_size=5), fn(q, db), atol=1e-6)  # created callable, square blocks
    qg, dbg = q.clone().requires_grad_(), db.clone().requires_grad_()
    weights = _randn(11, 7, seed=82)
    (fn(qg, dbg, a_mask=q_mask, b_mask=db_mask) * weights).sum().backward()
    dense_grads = qg.grad.clone(), dbg.grad.clone()
    qg.grad, dbg.grad = None, None
    tiled = score(qg, dbg, name, query_mask=q_mask, database_mask=db_mask, block_size=(3, 4), **kw)
    assert tiled.requires_grad
    (tiled * weights).sum().backward()
    assert torch.allclose(qg.grad, dense_grads[0], atol=1e-6) and torch.allclose(dbg.grad, dense_grads[1], atol=1e-6)


def test_score_topk_equals_dense_topk_for_tensor_numpy_and_zarr_databases():
    q, db = _randn(11, 4, 8, seed=83), _randn(23, 4, 8, seed=84)  # continuous: tie-free
    dense = smooth_chamfer(q, db)
    expected = dense.topk(5, dim=1)
    zarr_db = zarr.array(db.numpy(), chunks=(4, 4, 8))
    for database in (db, db.numpy(), zarr_db):
        values, indices = score(q, database, topk=5, block_size=(3, 4))
        assert torch.equal(indices, expected.indices)
        assert torch.allclose(values, expected.values, atol=1e-6)
    assert torch.allclose(score(q, zarr_db, block_size=(4, 5)), dense, atol=1e-6)


def test_score_topk_breaks_ties_by_lower_index():
    q, base = _randn(3, 2, 8, seed=85), _randn(4, 2, 8, seed=86)
    picks = torch.randint(0, 4, (150,), generator=torch.Generator().manual_seed(0))
    db = base[picks]  # [150, 2, 8], every score repeated ~37 times, ties across gallery blocks
    dense = max_similarity(q, db)
    for k, blocks in ((150, (2, 40)), (20, (3, 64))):
        values, indices = score(q, db, "max_similarity", topk=k, block_size=blocks)
        for row in range(3):
            order = sorted(range(150), key=lambda g, row=row: (-dense[row, g].item(), g))[:k]
            assert indices[row].tolist() == order
        assert torch.equal(values, dense.gather(1, indices))


def test_score_accepts_any_callable_and_numpy_masks():
    q, db = _randn(5, 3, 8, seed=87), _randn(6, 2, 8, seed=88)
    db_mask = _masks(6, 2, 3)

    def plain(a, b, a_mask=None, b_mask=None):
        return chamfer(a, b, a_mask=a_mask, b_mask=b_mask) * 2

    got = score(q, db.numpy(), plain, database_mask=db_mask.numpy(), block_size=(2, 4))
    assert torch.allclose(got, 2 * chamfer(q, db, b_mask=db_mask), atol=1e-6)


def test_score_auto_block_size_and_no_grad_when_inputs_do_not_require_it():
    q, db = _randn(9, 4, 16, seed=89), _randn(13, 4, 16, seed=90)
    s = score(q, db, alpha=8.0)
    assert not s.requires_grad and torch.allclose(s, smooth_chamfer(q, db, alpha=8.0), atol=1e-6)


# ------------------------------------------------------------------------------------------------ shape errors


def test_shape_errors_name_expected_and_actual_shapes():
    a, b = torch.randn(3, 4, 8), torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=r"expected a batch of sets \[N, K, D\], got shape \(3, 8\)"):
        smooth_chamfer(a[:, 0], b)
    with pytest.raises(ValueError, match=r"expected element width D=8 .*got shape \(5, 2, 6\)"):
        chamfer(a, torch.randn(5, 2, 6))
    with pytest.raises(ValueError, match=r"expected shape \(3, 4\) .*got \(3, 5\)"):
        max_similarity(a, b, a_mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected dtype bool"):
        mean_similarity(a, b, b_mask=torch.ones(5, 2))
    with pytest.raises(ValueError, match=r"database: expected element width D=8 .*got shape \(5, 2, 4\)"):
        score(a, torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"topk must be in \[1, G=5\] \(database \(5, 2, 8\)\), got 6"):
        score(a, b, topk=6)
    with pytest.raises(ValueError, match="block_size"):
        score(a, b, block_size=(0, 3))


def test_log_match_probability_equals_log_of_probability_and_never_underflows() -> None:
    """``log=True`` is log p where p is representable, and stays finite and rank-preserving where p underflows to 0."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    mask = torch.tensor([[True, True, False, True]] * 3)
    for kw in ({}, {"a_mask": mask}):
        p = match_probability(a, b, scale=1.5, shift=0.5, **kw)
        log_p = match_probability(a, b, scale=1.5, shift=0.5, log=True, **kw)
        torch.testing.assert_close(log_p, p.log())
    far = torch.cat([b, b + 40.0, b + 80.0])  # distances of ~40 and ~80 with scale 30: sigmoid underflows in float32
    p = match_probability(a, far, scale=30.0, shift=0.0)
    log_p = match_probability(a, far, scale=30.0, shift=0.0, log=True)
    assert (p[:, 5:] == 0).all()  # the plain probability ties every far pair at exactly 0
    assert torch.isfinite(log_p).all()
    assert (log_p[:, 5:10] > log_p[:, 10:]).all()  # nearer sets still rank higher


# ------------------------------------------------------------------------------------------------ PCME++ CSD


@st.composite
def gaussians_B2D(draw, max_sets: int = 5, width: int | None = None) -> torch.Tensor:
    """A batch of PCME++ (μ, σ) pairs [B, 2, D]: μ standard normal, σ = exp(N(0, 1)) > 0."""
    B = draw(st.integers(1, max_sets))
    D = width or draw(st.integers(1, 6))
    x = _randn(B, 2, D, seed=draw(st.integers(0, 2**31 - 1)))
    return torch.stack((x[:, 0], x[:, 1].exp()), dim=1)


def _naive_csd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """−E‖Z_a − Z_b‖² from the definition, float64: ‖μ_a − μ_b‖² + Σσ_a² + Σσ_b², negated."""
    a, b = a.double(), b.double()
    d2 = ((a[:, None, 0] - b[None, :, 0]) ** 2).sum(-1)  # [N, M]
    return -(d2 + (a[:, 1] ** 2).sum(-1)[:, None] + (b[:, 1] ** 2).sum(-1)[None, :])


def test_csd_is_registered_and_matches_definition_with_finite_gradients():
    assert "csd" in list_similarities()
    a = torch.stack((_randn(3, 8, seed=1), _randn(3, 8, seed=2).exp()), 1).requires_grad_()  # [3, 2, 8]
    b = torch.stack((_randn(5, 8, seed=3), _randn(5, 8, seed=4).exp()), 1).requires_grad_()  # [5, 2, 8]
    s = csd_similarity(a, b)
    assert s.shape == (3, 5) and s.dtype == torch.float32 and (s <= 0).all()
    torch.testing.assert_close(s.double(), _naive_csd(a.detach(), b.detach()), rtol=1e-5, atol=1e-4)
    (s * _randn(3, 5, seed=5)).sum().backward()
    for x in (a, b):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@HYPOTHESIS
@given(gaussians_B2D(width=4), gaussians_B2D(width=4))
def test_csd_is_expected_squared_distance_of_samples(a, b):
    """Monte-Carlo E‖Z_a − Z_b‖² over 20k independent draws agrees with the closed form (M§4.4b)."""
    gen = torch.Generator().manual_seed(0)
    za = a[:, None, 0] + a[:, None, 1] * torch.randn(a.shape[0], 20000, 4, generator=gen, dtype=a.dtype)
    zb = b[:, None, 0] + b[:, None, 1] * torch.randn(b.shape[0], 20000, 4, generator=gen, dtype=b.dtype)
    mc = ((za[:, None] - zb[None]) ** 2).sum(-1).mean(-1)  # [N, M] paired draws: independent Z_a, Z_b
    closed = closed_form_sampled_distance(a[:, 0], a[:, 1], b[:, 0], b[:, 1])
    torch.testing.assert_close(mc, closed, rtol=0.1, atol=0.1)


@HYPOTHESIS
@given(gaussians_B2D(), st.floats(1e-6, 1e-3))
def test_csd_sigma_to_zero_is_negative_squared_distance(a, tiny):
    b = a.flip(0).clone()
    a0, b0 = a.clone(), b.clone()
    a0[:, 1], b0[:, 1] = tiny, tiny
    expected = -(torch.cdist(a[:, 0].double(), b[:, 0].double()) ** 2)  # [N, M]
    D = a.shape[2]
    torch.testing.assert_close(csd_similarity(a0, b0).double(), expected, rtol=1e-4, atol=1e-4 + 2 * D * tiny**2)
    torch.testing.assert_close(csd_similarity(a, b, use_sigma=False).double(), expected, rtol=1e-4, atol=1e-4)
    # σ only adds the per-item constants Σσ²: it can only lower the score, never raise it
    assert (csd_similarity(a, b) <= csd_similarity(a, b, use_sigma=False) + 1e-6).all()


@HYPOTHESIS
@given(gaussians_B2D(), gaussians_B2D(), st.randoms(use_true_random=False))
def test_csd_is_symmetric_and_equivariant_to_item_permutations(a, b, rng):
    if a.shape[2] != b.shape[2]:
        b = torch.stack((_randn(b.shape[0], a.shape[2], seed=7), _randn(b.shape[0], a.shape[2], seed=8).exp()), 1)
    s = csd_similarity(a, b)
    torch.testing.assert_close(csd_similarity(b, a), s.T)
    pa, pb = torch.randperm(len(a)), torch.randperm(len(b))
    torch.testing.assert_close(csd_similarity(a[pa], b[pb]), s[pa][:, pb])
    # the (μ, σ) rows are not interchangeable elements: swapping them is a different pair
    assert csd_similarity(a.flip(1), b).shape == s.shape


def test_csd_rejects_non_pairs_and_partial_masks_and_tiles_like_the_dense_matrix():
    a = torch.stack((_randn(11, 8, seed=9), _randn(11, 8, seed=10).exp()), 1)
    b = torch.stack((_randn(7, 8, seed=11), _randn(7, 8, seed=12).exp()), 1)
    with pytest.raises(ValueError, match=r"\(mean, std\) pairs \[N, 2, D\]"):
        csd_similarity(_randn(3, 4, 8), b)
    with pytest.raises(ValueError, match="masks must be all True"):
        csd_similarity(a, b, a_mask=torch.tensor([[True, False]] * 11))
    torch.testing.assert_close(csd_similarity(a, b, a_mask=torch.ones(11, 2, dtype=torch.bool)), csd_similarity(a, b))
    torch.testing.assert_close(score(a, b, "csd", block_size=(3, 4)), csd_similarity(a, b))
    values, indices = score(a, b, "csd", topk=3)
    torch.testing.assert_close(values, csd_similarity(a, b).topk(3, dim=1).values)
    half = csd_similarity(a.bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
