"""Tests for setemb.losses: triplet with several positives, DivE / PVSE / PCME / MaxMatch terms, loss modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.heads import SetOutput
from setemb.losses import (
    PCME_KL_WEIGHT,
    ClosedFormSampledDistanceLoss,
    ProbabilisticMatchingLoss,
    TripletSetLoss,
    create_loss,
    csd_matching_loss,
    diversity_loss,
    global_discriminative_loss,
    gram_diversity_loss,
    intra_set_divergence_loss,
    kl_divergence_loss,
    list_losses,
    mmd_loss,
    pseudo_positive_labels,
    soft_contrastive_loss,
    triplet_loss,
    uniformity_loss,
)
from setemb.similarity import csd_similarity, list_similarities, match_probability

DTYPE = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DTYPE)


# ------------------------------------------------------------------------------------------------------- triplet


def _naive_triplet(sims, caption_to_image, margin, hardest):
    """Python-loop reference of M§4.1 (means over the C positive pairs / C captions)."""
    P, C = sims.shape
    c2i = caption_to_image.tolist()
    i2t, t2i = [], []
    for c in range(C):
        i = c2i[c]
        pos = sims[i, c]
        neg_captions = [sims[i, j] for j in range(C) if c2i[j] != i]
        neg_images = [sims[k, c] for k in range(P) if k != i]
        for negs, out in ((neg_captions, i2t), (neg_images, t2i)):
            if not negs:
                out.append(torch.zeros((), dtype=sims.dtype))
            elif hardest:
                out.append(torch.clamp(margin + max(negs) - pos, min=0))
            else:
                out.append(torch.stack([torch.clamp(margin + n - pos, min=0) for n in negs]).mean())
    return torch.stack(i2t).mean() + torch.stack(t2i).mean()


def _vsepp(scores, margin):
    """VSE++ ContrastiveLoss(max_violation=True) as in fartashf/vsepp model.py (sums over the batch)."""
    diagonal = scores.diag().view(-1, 1)
    cost_s = (margin + scores - diagonal).clamp(min=0)
    cost_im = (margin + scores - diagonal.t()).clamp(min=0)
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_s = cost_s.masked_fill(eye, 0).max(1)[0]
    cost_im = cost_im.masked_fill(eye, 0).max(0)[0]
    return cost_s.sum() + cost_im.sum()


SIMS_HAND = torch.tensor([[0.9, 0.8, 0.3, 0.5], [0.4, 0.85, 0.7, 0.6]], dtype=DTYPE)
C2I_HAND = torch.tensor([0, 0, 1, 1])


def test_triplet_hand_built_several_positives():
    # i2t: image 0 hardest negative 0.5 -> pairs (0,0), (0,1) satisfied; image 1 hardest negative 0.85 (caption 1)
    # -> 0.35 + 0.45. If caption 1 (0.8) were a negative of image 0, pair (0,0) would add 0.1.
    # t2i: caption 1: 0.2 + 0.85 - 0.8 = 0.25; caption 3: 0.2 + 0.5 - 0.6 = 0.1.
    expected = (0.35 + 0.45) / 4 + (0.25 + 0.1) / 4
    loss = triplet_loss(SIMS_HAND, C2I_HAND, margin=0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert triplet_loss(SIMS_HAND, C2I_HAND, margin=0.2, reduction="sum").item() == pytest.approx(4 * expected)


def test_triplet_same_image_caption_never_negative():
    # Raising a same-image caption's similarity (caption 1 of image 0) must never be penalised.
    sims = SIMS_HAND.clone()
    sims[0, 1] = 5.0
    loss = triplet_loss(sims, C2I_HAND, margin=0.2)
    # Caption 1's own terms vanish (0.2 + 0.5 - 5 < 0, 0.2 + 0.85 - 5 < 0); as a negative of image 0 it would add
    # 0.2 + 5 - 0.9 = 4.3 to pair (0, 0).
    assert loss.item() == pytest.approx((0.35 + 0.45) / 4 + 0.1 / 4, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    P=st.integers(1, 4),
    extra=st.integers(0, 5),
    hardest=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_triplet_matches_naive_reference(P, extra, hardest, seed):
    g = _gen(seed)
    c2i = torch.cat([torch.arange(P), torch.randint(0, P, (extra,), generator=g)])
    c2i = c2i[torch.randperm(len(c2i), generator=g)]
    sims = torch.rand(P, len(c2i), generator=g, dtype=DTYPE) * 2 - 1
    ours = triplet_loss(sims, c2i, margin=0.2, hardest=hardest)
    ref = _naive_triplet(sims, c2i, 0.2, hardest)
    torch.testing.assert_close(ours, ref)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_triplet_equals_vsepp_for_one_caption_per_image(B, seed):
    sims = torch.rand(B, B, generator=_gen(seed), dtype=DTYPE) * 2 - 1
    c2i = torch.arange(B)
    ref = _vsepp(sims, 0.2)
    torch.testing.assert_close(triplet_loss(sims, c2i, margin=0.2, reduction="sum"), ref)
    # Default reduction is DivE's mean over the C terms of each direction: VSE++ / B.
    torch.testing.assert_close(triplet_loss(sims, c2i, margin=0.2), ref / B)


@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_zero_when_positives_exceed_negatives_by_margin(hardest):
    c2i = torch.tensor([0, 0, 1, 2, 2])
    sims = torch.full((3, 5), 0.1, dtype=DTYPE)
    sims[c2i, torch.arange(5)] = 0.31  # positives beat every negative by 0.21 > 0.2
    assert triplet_loss(sims, c2i, margin=0.2, hardest=hardest).item() == 0.0
    sims[c2i, torch.arange(5)] = 0.29
    assert triplet_loss(sims, c2i, margin=0.2, hardest=hardest).item() > 0.0


def test_triplet_gradient_only_to_hardest_negatives():
    sims = SIMS_HAND.clone().requires_grad_(True)
    triplet_loss(sims, C2I_HAND, margin=0.2, hardest=True).backward()
    grad = sims.grad
    # Active hinges: i2t (image 1 vs caption 1) for captions 2, 3; t2i caption 1 (image 1), caption 3 (image 0).
    expected = torch.zeros_like(grad)
    expected[1, 1] += 2 / 4 + 1 / 4  # hardest negative caption of image 1 (twice), hardest image of caption 1
    expected[1, 2] -= 1 / 4
    expected[1, 3] -= 1 / 4 + 1 / 4
    expected[0, 1] -= 1 / 4
    expected[0, 3] += 1 / 4  # hardest negative image of caption 3
    torch.testing.assert_close(grad, expected)
    # The non-hardest negatives get no gradient at all.
    assert grad[0, 2] == 0 and grad[1, 0] == 0


def test_triplet_no_mining_spreads_gradient_over_all_violating_negatives():
    sims = SIMS_HAND.clone().requires_grad_(True)
    triplet_loss(sims, C2I_HAND, margin=0.2, hardest=False).backward()
    assert sims.grad[1, 0] > 0  # caption 0 is a violating, non-hardest negative of image 1 (0.2 + 0.4 - 0.6 > 0)


def test_triplet_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[P, C\]"):
        triplet_loss(SIMS_HAND, torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------- DivE / PVSE terms


def test_diversity_identical_orthogonal_and_single():
    e = F.normalize(_randn(3, 1, 8), dim=-1)
    assert diversity_loss(e.expand(3, 4, 8)).item() == pytest.approx(1.0)
    eye = torch.eye(4, dtype=DTYPE).expand(2, 4, 4)
    assert diversity_loss(eye).item() == pytest.approx(math.exp(-4))
    assert diversity_loss(e).item() == 0.0


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), K=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_diversity_matches_pair_sum(B, K, seed):
    e = F.normalize(_randn(B, K, 6, seed=seed), dim=-1)
    ref = torch.stack(
        [
            2
            / (K * (K - 1))
            * sum(torch.exp(-2 * (e[b, i] - e[b, j]).pow(2).sum()) for i in range(K) for j in range(i + 1, K))
            for b in range(B)
        ]
    ).mean()
    torch.testing.assert_close(diversity_loss(e), ref)


@pytest.mark.parametrize("kernel", ["rbf", "official"])
def test_mmd_identical_shifted_symmetric(kernel):
    x, y = _randn(12, 5, seed=1), _randn(9, 5, seed=2)
    assert abs(mmd_loss(x, x, kernel=kernel).item()) < 1e-12
    shifted = mmd_loss(x, y + 2.0, kernel=kernel)
    assert shifted.item() > mmd_loss(x, y, kernel=kernel).item() > 0
    torch.testing.assert_close(mmd_loss(x, y, kernel=kernel), mmd_loss(y, x, kernel=kernel))


@pytest.mark.parametrize("kernel", ["rbf", "official"])
def test_mmd_matches_naive_reference(kernel):
    x, y = _randn(4, 3, seed=3), _randn(5, 3, seed=4)

    def k(a, b):
        d = (a - b).norm()
        return torch.exp(-0.5 * (d**2 if kernel == "rbf" else d))

    def mean_k(a, b):
        return torch.stack([k(u, v) for u in a for v in b]).mean()

    ref = mean_k(x, x) - 2 * mean_k(x, y) + mean_k(y, y)
    torch.testing.assert_close(mmd_loss(x, y, kernel=kernel, gamma=0.5), ref)


@pytest.mark.parametrize("kernel", ["rbf", "official"])
def test_mmd_finite_gradient_at_identical_points(kernel):
    x = _randn(6, 4).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    mmd_loss(x, y, kernel=kernel).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_gram_zero_for_orthonormal_and_known_for_identical():
    q, _ = torch.linalg.qr(_randn(6, 6))
    orthonormal = q.T[:3].unsqueeze(0).clone().requires_grad_(True)  # [1, 3, 6] orthonormal rows
    loss = gram_diversity_loss(orthonormal)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(orthonormal.grad).all()
    identical = _randn(2, 1, 6).expand(2, 4, 6)
    assert gram_diversity_loss(identical).item() == pytest.approx(math.sqrt(16 - 4) / 16)


# -------------------------------------------------------------------------------------------------------- PCME


def _naive_soft_contrastive(img, txt, c2i, scale, shift):
    P, J, _ = img.shape
    C = txt.shape[0]
    terms = []
    for i in range(P):
        for c in range(C):
            probs = [torch.sigmoid(-scale * (img[i, j] - txt[c, k]).norm() + shift) for j in range(J) for k in range(J)]
            p = torch.stack(probs).mean()
            terms.append(-torch.log(p) if c2i[c] == i else -torch.log(1 - p))
    return torch.stack(terms).mean()


def test_soft_contrastive_matches_naive_reference():
    img, txt = _randn(2, 3, 4, seed=5), _randn(3, 3, 4, seed=6)
    c2i = torch.tensor([1, 0, 1])
    ours = soft_contrastive_loss(img, txt, c2i, scale=1.5, shift=2.0)
    torch.testing.assert_close(ours, _naive_soft_contrastive(img, txt, c2i, 1.5, 2.0))


def test_soft_contrastive_decreases_when_matching_pairs_move_closer():
    img, txt = _randn(3, 2, 4, seed=7), _randn(3, 2, 4, seed=8)
    c2i = torch.arange(3)
    before = soft_contrastive_loss(img, txt, c2i, scale=2.0, shift=2.0)
    closer = txt + 0.5 * (img - txt)  # caption c is the match of image c: halve every matching distance's offset
    after = soft_contrastive_loss(img, closer, c2i, scale=2.0, shift=2.0)
    assert after.item() < before.item()


def test_soft_contrastive_equals_match_probability_convention():
    img, txt = _randn(1, 3, 4, seed=9), _randn(1, 3, 4, seed=10)
    loss = soft_contrastive_loss(img, txt, torch.tensor([0]), scale=1.2, shift=0.7)
    p = match_probability(img, txt, scale=1.2, shift=0.7)  # [1, 1]
    torch.testing.assert_close(loss, -torch.log(p[0, 0]).to(loss.dtype))


def test_kl_zero_at_standard_normal_and_matches_torch():
    assert kl_divergence_loss(torch.zeros(3, 5), torch.zeros(3, 5)).item() == 0.0
    mean, logsigma = _randn(4, 5, seed=11), 0.3 * _randn(4, 5, seed=12)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, logsigma.exp()), torch.distributions.Normal(0.0, 1.0)
    )
    torch.testing.assert_close(kl_divergence_loss(mean, logsigma), ref.sum(-1).mean())


def test_uniformity_matches_naive_reference():
    x = _randn(5, 3, seed=13)
    n = len(x)
    ref = torch.log(
        torch.stack([torch.exp(-2 * (x[i] - x[j]).pow(2).sum()) for i in range(n) for j in range(n) if i != j]).mean()
    )
    torch.testing.assert_close(uniformity_loss(x), ref)
    assert uniformity_loss(x[:1]).item() == 0.0


# ---------------------------------------------------------------------------------------------------- MaxMatch


def test_global_discriminative_and_intra_set_divergence():
    eye = torch.eye(4, dtype=DTYPE)
    elements = eye[:3].unsqueeze(0)  # [1, 3, 4] orthogonal
    assert global_discriminative_loss(elements, eye[3:4]).item() == 0.0  # orthogonal to the global embedding
    assert global_discriminative_loss(elements, eye[0:1]).item() == pytest.approx(1 / 3)
    assert global_discriminative_loss(elements, eye[0:1], margin=0.5).item() == pytest.approx(0.5 / 3)
    assert intra_set_divergence_loss(elements).item() == 0.0
    assert intra_set_divergence_loss(eye[:1].expand(1, 3, 4)).item() == pytest.approx(1.0)
    assert intra_set_divergence_loss(eye[:1].unsqueeze(0)).item() == 0.0


# ------------------------------------------------------------------------------------------------------- modules


def _set_output(B, K, D, seed, requires_grad=True):
    g = _gen(seed)
    elements = torch.randn(B, K, D, generator=g).requires_grad_(requires_grad)
    global_ = torch.randn(B, D, generator=g).requires_grad_(requires_grad)
    embeddings = F.normalize(F.normalize(elements, dim=-1) + global_[:, None], dim=-1)
    return SetOutput(
        embeddings=embeddings,
        elements=F.normalize(elements, dim=-1),
        global_embedding=F.normalize(global_, dim=-1),
    ), elements


TRIPLET_KEYS = {"loss", "triplet", "diversity", "mmd", "global_discriminative", "intra_set_divergence"}


@pytest.mark.parametrize("similarity", list_similarities())
def test_triplet_set_loss_every_similarity_backprops(similarity):
    K, L = (2, 2) if similarity == "csd" else (4, 3)  # csd compares (μ, σ) pairs
    img, img_leaf = _set_output(3, K, 8, seed=1)
    txt, txt_leaf = _set_output(6, L, 8, seed=2)
    c2i = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = create_loss("triplet", similarity=similarity, margin=0.5)
    out = loss_fn(img, txt, c2i)
    assert set(out) == TRIPLET_KEYS
    assert out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert img_leaf.grad is not None and img_leaf.grad.abs().sum() > 0
    assert txt_leaf.grad is not None and txt_leaf.grad.abs().sum() > 0
    assert loss_fn.similarity_name == similarity
    assert loss_fn.similarity_kwargs() == {}


@pytest.mark.parametrize("diversity", ["dive", "gram"])
def test_triplet_set_loss_all_terms(diversity):
    img, _ = _set_output(2, 4, 8, seed=3)
    txt, _ = _set_output(4, 2, 8, seed=4)
    c2i = torch.tensor([0, 1, 0, 1])
    weights = dict(
        diversity_weight=0.1, mmd_weight=0.01, global_discriminative_weight=0.2, intra_set_divergence_weight=0.3
    )
    loss_fn = TripletSetLoss(
        similarity="smooth_chamfer", similarity_kwargs={"alpha": 16.0}, diversity=diversity, **weights
    )
    out = loss_fn(img, txt, c2i)
    div_fn = diversity_loss if diversity == "dive" else gram_diversity_loss
    torch.testing.assert_close(out["diversity"], (div_fn(img.elements) + div_fn(txt.elements)).detach())
    torch.testing.assert_close(
        out["mmd"], mmd_loss(img.embeddings.reshape(-1, 8), txt.embeddings.reshape(-1, 8)).detach()
    )
    expected = (
        out["triplet"]
        + 0.1 * out["diversity"]
        + 0.01 * out["mmd"]
        + 0.2 * out["global_discriminative"]
        + 0.3 * out["intra_set_divergence"]
    )
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert all(out[k] > 0 for k in ("diversity", "mmd", "global_discriminative", "intra_set_divergence"))
    assert loss_fn.similarity_kwargs() == {"alpha": 16.0}


def test_triplet_set_loss_warm_up_switch_and_bad_options():
    img, _ = _set_output(3, 2, 8, seed=5)
    txt, _ = _set_output(6, 2, 8, seed=6)
    c2i = torch.tensor([0, 1, 2, 0, 1, 2])
    loss_fn = TripletSetLoss(margin=0.5)
    hard = loss_fn(img, txt, c2i)["triplet"]
    loss_fn.set_hardest_negatives(False)
    soft = loss_fn(img, txt, c2i)["triplet"]
    sims = loss_fn.similarity(img.embeddings, txt.embeddings)
    torch.testing.assert_close(soft, triplet_loss(sims, c2i, margin=0.5, hardest=False).detach())
    assert soft < hard
    with pytest.raises(ValueError, match="diversity"):
        TripletSetLoss(diversity="pvse")
    with pytest.raises(ValueError, match="unknown loss"):
        create_loss("vsepp")
    assert list_losses() == ["pcme", "pcmepp", "triplet"]


def _pcme_output(B, J, D, seed):
    g = _gen(seed)
    mean = torch.randn(B, D, generator=g).requires_grad_(True)
    logsigma = (0.1 * torch.randn(B, D, generator=g)).requires_grad_(True)
    samples = mean[:, None] + logsigma.exp()[:, None] * torch.randn(B, J, D, generator=g)
    return SetOutput(embeddings=samples, mean=mean, logsigma=logsigma)


def test_pcme_parameters_registered_and_trained():
    loss_fn = create_loss("pcme", init_scale=5.0, init_shift=5.0, kl_weight=1e-3, uniformity_weight=0.1)
    names = {name for name, _ in loss_fn.named_parameters()}
    assert names == {"log_scale", "shift"}
    img, txt = _pcme_output(2, 3, 4, seed=1), _pcme_output(4, 3, 4, seed=2)
    out = loss_fn(img, txt, torch.tensor([0, 0, 1, 1]))
    assert {"loss", "soft_contrastive", "kl", "uniformity", "scale", "shift"} <= set(out)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    for name, param in loss_fn.named_parameters():
        assert param.grad is not None and param.grad.abs() > 0, f"No gradient for {name}"
    assert img.mean.grad.abs().sum() > 0 and txt.logsigma.grad.abs().sum() > 0
    assert loss_fn.similarity_name == "match_probability"
    kwargs = loss_fn.similarity_kwargs()
    assert kwargs.pop("log") is True  # evaluation ranks by log match probability (no underflow)
    assert kwargs == pytest.approx({"scale": 10.0, "shift": 10.0})


def test_pcme_loss_consistent_with_its_similarity_kwargs():
    loss_fn = ProbabilisticMatchingLoss(init_scale=0.6, init_shift=0.4, kl_weight=0.0)
    img, txt = _pcme_output(1, 3, 4, seed=3), _pcme_output(1, 3, 4, seed=4)
    out = loss_fn(img, txt, torch.tensor([0]))
    log_p = match_probability(img.embeddings, txt.embeddings, **loss_fn.similarity_kwargs())  # [1, 1] log p
    torch.testing.assert_close(out["soft_contrastive"], -log_p[0, 0].detach())
    torch.testing.assert_close(out["loss"].detach(), out["soft_contrastive"])


def test_pcme_kl_weight_is_official_vib_beta_over_two_batch():
    """Official PCME sums the NLL over the 2·B² (i2t + t2i) pairs and the KL over B·D; ours averages both, so the
    same objective (up to the factor 2·B²) needs ``kl_weight = vib_beta / (2·B)`` — the default for B = 128."""
    B, J, D, beta = 4, 3, 5, 1e-2
    img, txt = _pcme_output(B, J, D, seed=5), _pcme_output(B, J, D, seed=6)
    loss_fn = ProbabilisticMatchingLoss(init_scale=0.5, init_shift=0.5, kl_weight=beta / (2 * B))
    ours = loss_fn(img, txt, torch.arange(B))["loss"].detach()
    p = match_probability(img.embeddings, txt.embeddings, **loss_fn.similarity_kwargs()).exp()  # [B, B]
    positive = torch.eye(B, dtype=torch.bool)
    nll_sum = 2 * (-torch.where(positive, p.log(), (1 - p).log())).sum()  # i2t and t2i, as the official code
    kl_sum = sum((0.5 * (torch.exp(2 * out.logsigma) + out.mean**2 - 1 - 2 * out.logsigma)).sum() for out in (img, txt))
    torch.testing.assert_close(ours * 2 * B**2, (nll_sum + beta * kl_sum).to(ours.dtype), rtol=1e-5, atol=1e-6)
    assert PCME_KL_WEIGHT == pytest.approx(1e-5 / 256)  # PCME's COCO vib_beta 1e-5 at its batch of 128
    assert ProbabilisticMatchingLoss().kl_weight == PCME_KL_WEIGHT


# ---------------------------------------------------------------------------------------------------------- PCME++


def _pcmepp_output(B, D, seed):
    g = _gen(seed)
    mean = F.normalize(torch.randn(B, D, generator=g, dtype=DTYPE), dim=-1).requires_grad_(True)
    logsigma = (0.3 * torch.randn(B, D, generator=g, dtype=DTYPE) - 1.0).requires_grad_(True)
    return SetOutput(embeddings=torch.stack((mean, logsigma.exp()), 1), mean=mean, logsigma=logsigma)


def test_pseudo_positive_labels_hand_built():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.0, 4.0, 5.0, -1.0]])
    matched = torch.tensor([[True, True, False, False], [False, True, False, False]])
    labels = pseudo_positive_labels(logits, matched)
    # row 0: col 2 (2.0) scores above one of its two positives (1.0, not 3.0): label 1/2; col 3 (0.5) above none.
    # row 1 has one positive (4.0), PCME++'s case: col 2 (5.0) joins with label 1
    assert labels.tolist() == [[1.0, 1.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0]]
    no_positive = pseudo_positive_labels(logits, torch.zeros_like(matched))
    assert (no_positive == 0).all()
    # a tie with a positive counts ("at least as well"); a collapsed embedding labels every pair
    assert (pseudo_positive_labels(torch.zeros(2, 4), matched) == 1).all()


def test_csd_matching_loss_matches_naive_bce_reference():
    img, txt = _pcmepp_output(3, 5, seed=1), _pcmepp_output(6, 5, seed=2)
    c2i = torch.tensor([0, 0, 1, 1, 2, 2])
    scale, shift = 2.0, 3.0
    total, main, pseudo = csd_matching_loss(
        img.mean, img.logsigma.exp(), txt.mean, txt.logsigma.exp(), c2i, scale, shift, pseudo_positive_weight=0.1
    )
    csd = -csd_similarity(img.embeddings.detach(), txt.embeddings.detach()).double()  # [P, C]
    logits = -scale * csd + shift
    m = (c2i[None, :] == torch.arange(3)[:, None]).double()
    p = torch.sigmoid(logits)

    def bce(y):
        return -(y * p.log() + (1 - y) * (1 - p).log()).mean()

    torch.testing.assert_close(main.detach(), 2 * bce(m), rtol=1e-6, atol=1e-8)

    def soft(lg, mm):  # loops: the fraction of each row's positives that an entry scores at least as well as
        out = torch.zeros_like(lg)
        for r in range(lg.shape[0]):
            pos = [lg[r, q] for q in range(lg.shape[1]) if mm[r, q]]
            for g in range(lg.shape[1]):
                out[r, g] = 1.0 if mm[r, g] else sum(float(lg[r, g] >= v) for v in pos) / max(len(pos), 1)
        return out

    torch.testing.assert_close(pseudo.detach(), bce(soft(logits, m)) + bce(soft(logits.T, m.T).T))
    torch.testing.assert_close(total.detach(), main.detach() + 0.1 * pseudo.detach())
    _, _, none = csd_matching_loss(img.mean, img.logsigma.exp(), txt.mean, txt.logsigma.exp(), c2i, scale, shift)
    assert none == 0


def test_csd_matching_loss_prefers_close_positives_and_small_sigma():
    img, txt = _pcmepp_output(2, 4, seed=3), _pcmepp_output(2, 4, seed=4)
    c2i = torch.tensor([0, 1])
    base, _, _ = csd_matching_loss(img.mean, img.logsigma.exp(), txt.mean, txt.logsigma.exp(), c2i, 1.0, 1.0)
    closer, _, _ = csd_matching_loss(img.mean, img.logsigma.exp(), img.mean, txt.logsigma.exp(), c2i, 1.0, 1.0)
    assert closer < base  # positives at zero mean distance
    base.backward()
    assert (img.logsigma.grad > 0).all()  # here every pair is too far: shrinking σ lowers every CSD


def test_pcmepp_loss_parameters_components_and_similarity():
    loss_fn = create_loss("pcmepp", init_scale=4.0, init_shift=2.0, vib_weight=1e-2, pseudo_positive_weight=0.1)
    assert isinstance(loss_fn, ClosedFormSampledDistanceLoss)
    assert {n for n, _ in loss_fn.named_parameters()} == {"log_scale", "shift"}
    img, txt = _pcmepp_output(2, 4, seed=5), _pcmepp_output(4, 4, seed=6)
    out = loss_fn(img, txt, torch.tensor([0, 0, 1, 1]))
    assert {"loss", "matching", "pseudo_positive", "kl", "scale", "shift"} <= set(out)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    expected_kl = (kl_divergence_loss(img.mean, img.logsigma) + kl_divergence_loss(txt.mean, txt.logsigma)) / 4
    torch.testing.assert_close(out["kl"], expected_kl.detach())
    torch.testing.assert_close(out["loss"].detach(), out["matching"] + 0.1 * out["pseudo_positive"] + 1e-2 * out["kl"])
    out["loss"].backward()
    for name, param in loss_fn.named_parameters():
        assert param.grad is not None and param.grad.abs() > 0, f"No gradient for {name}"
    assert torch.isfinite(img.mean.grad).all() and txt.logsigma.grad.abs().sum() > 0
    assert loss_fn.similarity_name == "csd" and loss_fn.similarity_kwargs() == {}
    with pytest.raises(ValueError, match="needs img.mean"):
        loss_fn(SetOutput(embeddings=img.embeddings), txt, torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        create_loss("pcmepp", init_scale=0.0)


def test_pcmepp_pseudo_positives_wait_for_their_warmup_epochs():
    loss_fn = create_loss("pcmepp", vib_weight=0.0, pseudo_positive_weight=0.1, pseudo_positive_warmup_epochs=2)
    img, txt = _pcmepp_output(3, 4, seed=7), _pcmepp_output(6, 4, seed=8)
    c2i = torch.tensor([0, 0, 1, 1, 2, 2])
    for epoch, weight in ((0, 0.0), (1, 0.0), (2, 0.1), (5, 0.1)):
        loss_fn.set_epoch(epoch)
        out = loss_fn(img, txt, c2i)
        assert out["pseudo_positive"] == 0 if weight == 0 else out["pseudo_positive"] > 0
        torch.testing.assert_close(out["loss"].detach(), out["matching"] + weight * out["pseudo_positive"])
    with pytest.raises(ValueError, match="pseudo_positive_warmup_epochs must be >= 0"):
        create_loss("pcmepp", pseudo_positive_warmup_epochs=-1)
