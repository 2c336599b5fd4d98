"""Training losses: triplet with several positives, DivE / PVSE / PCME / MaxMatch regularisers (M§4).

Batch layout (M§4.1): P images and all their C captions; ``caption_to_image [C] long`` maps caption c to its image
``0..P-1`` and the similarity matrix is ``sims [P, C]``. The functions take plain tensors; the modules registered in
``LOSSES`` (``create_loss``) read ``SetOutput`` fields and return ``{"loss": total, <component>: detached}``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setemb.registry import Registry
from setemb.similarity import closed_form_sampled_distance, create_similarity

if TYPE_CHECKING:
    from setemb.heads import SetOutput

logger = logging.getLogger(__name__)

LOSSES: Registry[nn.Module] = Registry("loss")

_SQRT_EPS = 1e-12


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 when it is half / bfloat16 (losses are computed in float32 or wider)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``[n, m]`` between rows of ``a [n, D]`` and ``b [m, D]``, clamped at 0."""
    d2 = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2.0 * a @ b.T  # [n, m]
    return d2.clamp_min(0.0)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for ``x >= 0`` with value 0 and a zero (finite) gradient at ``x <= 1e-12``.

    ``d sqrt(x)/dx = 1/(2 sqrt(x))`` is infinite at 0, which turns ``0 * inf`` into NaN for identical points.
    """
    positive = x > _SQRT_EPS
    return torch.where(positive, x.clamp_min(_SQRT_EPS).sqrt(), torch.zeros_like(x))


def _check_sets(name: str, x: Tensor) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} expects elements [B, K, D], got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------- triplet (M§4.1)


def triplet_loss(
    sims: Tensor,
    caption_to_image: Tensor,
    margin: float = 0.2,
    hardest: bool = True,
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Bidirectional triplet loss with several positives per image (M§4.1, DivE eq. 9).

    i2t, for every positive pair (image i, caption p), one per caption: ``[δ + max_{j neg of i} Σ_ij − Σ_ip]_+``;
    t2i, for every caption j of image i*: ``[δ + max_{i≠i*} Σ_ij − Σ_{i*j}]_+``. Returns ``i2t + t2i``, each reduced
    over its C terms. Other captions of the same image are positives, never negatives. With one caption per image,
    P = C and ``reduction="sum"`` this is exactly the VSE++ max-violation loss (M§4.6); DivE's code (and the default
    here) takes means, i.e. VSE++ / C.

    ``hardest=False`` is the "no mining" warm-up: each hinge is averaged over *all* negatives of its anchor (mean over
    the negatives of one pair / caption, then the reduction over the C pairs); anchors without negatives give 0.

    Args:
        sims: ``[P, C]`` float, image-to-caption similarities Σ.
        caption_to_image: ``[C]`` long, image index of each caption, in ``0..P-1``.
        margin: δ.
        hardest: hardest negative (max violation) if True, else mean over all negatives.
        reduction: ``"mean"`` (DivE code) or ``"sum"`` (paper / VSE++) over the C terms of each direction.

    Returns:
        scalar tensor.
    """
    if sims.ndim != 2 or caption_to_image.shape != (sims.shape[1],):
        raise ValueError(
            f"triplet_loss expects sims [P, C] and caption_to_image [C], got {tuple(sims.shape)} and "
            f"{tuple(caption_to_image.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    P, C = sims.shape
    caption_to_image = caption_to_image.to(device=sims.device, dtype=torch.long)
    images = torch.arange(P, device=sims.device)
    positive = caption_to_image[None, :] == images[:, None]  # [P, C]
    positive_sims = sims.gather(0, caption_to_image[None, :]).squeeze(0)  # [C] Σ_{i*(c), c}
    if hardest:
        negatives = sims.masked_fill(positive, torch.finfo(sims.dtype).min)  # [P, C]
        hardest_caption = negatives.amax(dim=1)  # [P] hardest negative caption of each image
        i2t = F.relu(margin + hardest_caption[caption_to_image] - positive_sims)  # [C] one per positive pair
        t2i = F.relu(margin + negatives.amax(dim=0) - positive_sims)  # [C]
    else:
        negative = ~positive  # [P, C]
        pair_negative = negative[caption_to_image]  # [C, C] negatives of the image of pair c
        hinge_i2t = F.relu(margin + sims[caption_to_image] - positive_sims[:, None]) * pair_negative  # [C, C]
        i2t = hinge_i2t.sum(1) / pair_negative.sum(1).clamp_min(1)  # [C]
        hinge_t2i = F.relu(margin + sims - positive_sims[None, :]) * negative  # [P, C]
        t2i = hinge_t2i.sum(0) / negative.sum(0).clamp_min(1)  # [C]
    if reduction == "sum":
        return i2t.sum() + t2i.sum()
    return i2t.mean() + t2i.mean()


# ------------------------------------------------------------------------------------- DivE / PVSE regularisers


def diversity_loss(elements: Tensor) -> Tensor:
    """DivE diversity regulariser (M§4.2; code name ``unif``).

    ``mean_b [ 2/(K(K−1)) Σ_{i<j} exp(−2‖ê_i − ê_j‖²) ]``: 1 when all elements coincide, ``exp(−4)`` for orthogonal
    ones, 0 for K = 1. Rows are L2-normalised inside (a no-op for ``SetOutput.elements``).

    Args:
        elements: ``[B, K, D]`` set elements before the global feature is added.

    Returns:
        scalar tensor.
    """
    _check_sets("diversity_loss", elements)
    B, K, D = elements.shape
    if K < 2:
        return elements.new_zeros((), dtype=_wide(elements).dtype)
    e = F.normalize(_wide(elements), dim=-1)
    d2 = (2.0 - 2.0 * e @ e.transpose(1, 2)).clamp_min(0.0)  # [B, K, K] ‖ê_i − ê_j‖² for unit rows
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=elements.device)
    # The mean over ordered pairs i≠j equals 2/(K(K−1)) Σ_{i<j} since the kernel is symmetric.
    return torch.exp(-2.0 * d2)[:, off_diagonal].mean()


def mmd_loss(x: Tensor, y: Tensor, kernel: Literal["rbf", "official"] = "rbf", gamma: float = 0.5) -> Tensor:
    """Biased MMD² between two point clouds (M§4.2 DivE, M§4.3 PVSE).

    ``MMD² = mean k(X, X) − 2 mean k(X, Y) + mean k(Y, Y)``, diagonals included. Kernels:

    - ``rbf``: ``exp(−γ‖a − b‖²)``, the Gaussian kernel both papers describe (characteristic, smooth at a = b,
      so MMD² is a proper squared distance between distributions). Default.
    - ``official``: ``exp(−γ‖a − b‖₂)`` with the *non-squared* distance (Laplacian-type), which the DivE and PVSE
      code actually compute (γ = 0.5); kept to reproduce them. The sqrt is guarded so a = b has a finite gradient.

    Args:
        x: ``[n, D]`` samples of the first distribution (e.g. the P·K image elements of a batch).
        y: ``[m, D]`` samples of the second (e.g. the C·L caption elements).
        kernel: ``"rbf"`` or ``"official"``.
        gamma: kernel coefficient γ.

    Returns:
        scalar tensor, ≥ 0 up to rounding.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_loss expects x [n, D] and y [m, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    if kernel not in ("rbf", "official"):
        raise ValueError(f"mmd kernel must be 'rbf' or 'official', got {kernel!r}")
    x, y = _wide(x), _wide(y)

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = _squared_distances(a, b)  # [n, m]
        return torch.exp(-gamma * (d2 if kernel == "rbf" else _safe_sqrt(d2)))

    return k(x, x).mean() - 2.0 * k(x, y).mean() + k(y, y).mean()


def gram_diversity_loss(elements: Tensor) -> Tensor:
    """PVSE diversity loss (M§4.3): ``‖G − I‖_F / K²`` per sample with ``G = Ῡ Ῡᵀ``, mean over the batch.

    Args:
        elements: ``[B, K, D]`` PIE-Net Υ (pre-fusion); rows are L2-normalised inside (Ῡ).

    Returns:
        scalar tensor; 0 for orthonormal sets (the Frobenius sqrt is guarded there).
    """
    _check_sets("gram_diversity_loss", elements)
    B, K, D = elements.shape
    u = F.normalize(_wide(elements), dim=-1)
    gram = u @ u.transpose(1, 2)  # [B, K, K]
    eye = torch.eye(K, dtype=gram.dtype, device=gram.device)
    frobenius = _safe_sqrt((gram - eye).pow(2).sum(dim=(1, 2)))  # [B]
    return (frobenius / K**2).mean()


# ---------------------------------------------------------------------------------------------------- PCME (M§4.4)


def soft_contrastive_loss(
    img_samples: Tensor,
    txt_samples: Tensor,
    caption_to_image: Tensor,
    scale: float | Tensor,
    shift: float | Tensor,
) -> Tensor:
    """PCME soft contrastive loss (M§4.4) over all P × C pairs, computed once (no duplicated "t2i" copy, pcme#3).

    ``p(m|i, c) = (1/J²) Σ_{j,j'} sigmoid(l)``, ``l = −scale‖z_i^j − z_c^{j'}‖₂ + shift``: the same plain-sigmoid
    convention as ``similarity.match_probability`` on raw (un-normalised) samples. PCME writes ``σ₂(−a d + b) =
    sigmoid(−2a d + 2b)``, so PCME's (a, b) correspond to ``scale = 2a, shift = 2b`` here
    (``ProbabilisticMatchingLoss`` does that conversion). Matching pairs (m = +1) cost ``−log p``, the others
    ``−log(1 − p)``, computed stably as ``log p = LSE_{j,j'}(logsigmoid(l)) − log J²`` and
    ``log(1 − p) = LSE_{j,j'}(logsigmoid(−l)) − log J²``; mean over the P·C pairs.

    Args:
        img_samples: ``[P, J, D]`` image samples ``z_i^j``.
        txt_samples: ``[C, J, D]`` caption samples ``z_c^{j'}`` (J may differ from the image side).
        caption_to_image: ``[C]`` long, image of each caption.
        scale: positive distance scale (scalar float or 0-d tensor, learnable).
        shift: logit shift (scalar float or 0-d tensor, learnable).

    Returns:
        scalar tensor.
    """
    if img_samples.ndim != 3 or txt_samples.ndim != 3 or img_samples.shape[2] != txt_samples.shape[2]:
        raise ValueError(
            f"soft_contrastive_loss expects img [P, J, D] and txt [C, J, D], got {tuple(img_samples.shape)} and "
            f"{tuple(txt_samples.shape)}"
        )
    P, J, D = img_samples.shape
    C, Jt, _ = txt_samples.shape
    if caption_to_image.shape != (C,):
        raise ValueError(f"caption_to_image must be [C] = [{C}], got {tuple(caption_to_image.shape)}")
    img, txt = _wide(img_samples), _wide(txt_samples)
    d2 = _squared_distances(img.reshape(P * J, D), txt.reshape(C * Jt, D))  # [P*J, C*Jt]
    d2 = d2.view(P, J, C, Jt).permute(0, 2, 1, 3).reshape(P, C, J * Jt)  # [P, C, J*Jt]
    logits = -scale * _safe_sqrt(d2) + shift  # [P, C, J*Jt]
    log_pairs = math.log(J * Jt)
    log_match = torch.logsumexp(F.logsigmoid(logits), dim=-1) - log_pairs  # [P, C] log p
    log_nonmatch = torch.logsumexp(F.logsigmoid(-logits), dim=-1) - log_pairs  # [P, C] log(1 − p)
    images = torch.arange(P, device=img.device)
    matching = caption_to_image.to(img.device)[None, :] == images[:, None]  # [P, C]
    return -torch.where(matching, log_match, log_nonmatch).mean()


def kl_divergence_loss(mean: Tensor, logsigma: Tensor) -> Tensor:
    """``KL(N(μ, σ²) || N(0, I))`` summed over D, averaged over the batch (PCME VIB term, M§4.4).

    ``logsigma`` is treated as the log *standard deviation*, as PCME's sampling ``z = μ + exp(logσ) ε`` does:
    ``KL = ½ Σ_d (σ² + μ² − 1 − 2 log σ)``. The official PCME KL, ``−½ Σ (1 + logσ − μ² − e^{logσ})``, treats the
    same tensor as the log-variance; we use one consistent reading.

    Args:
        mean: ``[B, D]`` μ.
        logsigma: ``[B, D]`` log σ.

    Returns:
        scalar tensor, 0 at μ = 0, log σ = 0.
    """
    if mean.ndim != 2 or mean.shape != logsigma.shape:
        raise ValueError(
            f"kl_divergence_loss expects mean and logsigma [B, D], got {tuple(mean.shape)} and {tuple(logsigma.shape)}"
        )
    mean, logsigma = _wide(mean), _wide(logsigma)
    kl = 0.5 * (torch.exp(2.0 * logsigma) + mean.pow(2) - 1.0 - 2.0 * logsigma)  # [B, D]
    return kl.sum(dim=-1).mean()


def uniformity_loss(x: Tensor) -> Tensor:
    """PCME uniformity ``log mean_{x≠y} exp(−2‖x − y‖²)`` over distinct points (M§4.4), via logsumexp.

    Args:
        x: ``[n, D]`` points (e.g. all samples of a batch, flattened). PCME subsamples to 128 points; callers that
            want that subsample before calling.

    Returns:
        scalar tensor; 0 when n < 2.
    """
    if x.ndim != 2:
        raise ValueError(f"uniformity_loss expects x [n, D], got {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        return x.new_zeros((), dtype=_wide(x).dtype)
    d2 = _squared_distances(_wide(x), _wide(x))  # [n, n]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return torch.logsumexp(-2.0 * d2[off_diagonal], dim=0) - math.log(n * (n - 1))


# ------------------------------------------------------------------------------------------------ PCME++ (M§4.4b)


def pseudo_positive_labels(logits: Tensor, matched: Tensor) -> Tensor:
    """PCME++ pseudo-positives (Chun, ICLR 2024, §3.3; M§4.4b): in-batch "negatives" scored at least as well as a
    positive of the same query become positives.

    Row-wise: query r's threshold is its *least* similar positive, ``t_r = min_{c: m_rc} logits_rc``; every entry
    with ``logits_rc ≥ t_r`` gets label 1 (true positives keep 1, the others keep 0). PCME++'s batches have one
    positive per query (the official code takes that one's logit); with several captions per image we take the
    least similar one, i.e. "not less similar than one of the query's own positives". Rows without a positive
    are unchanged. Not differentiable (labels); call it on detached logits.

    Args:
        logits: ``[Q, G]`` match logits (larger = more similar), queries in rows.
        matched: ``[Q, G]`` bool ground truth.

    Returns:
        ``[Q, G]`` float labels in {0, 1}.
    """
    if logits.shape != matched.shape or logits.ndim != 2:
        raise ValueError(
            f"pseudo_positive_labels expects logits and matched [Q, G], got {tuple(logits.shape)} and "
            f"{tuple(matched.shape)}"
        )
    threshold = logits.masked_fill(~matched, float("inf")).amin(dim=1, keepdim=True)  # [Q, 1], +inf: no positive
    return (matched | (logits >= threshold)).to(logits.dtype)  # [Q, G]


def csd_matching_loss(
    img_mean: Tensor,
    img_std: Tensor,
    txt_mean: Tensor,
    txt_std: Tensor,
    caption_to_image: Tensor,
    scale: float | Tensor,
    shift: float | Tensor,
    pseudo_positive_weight: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """PCME++ probabilistic matching loss (Chun, ICLR 2024, eq. 3 + §3.3; M§4.4b) over all P × C pairs.

    ``l_ic = −scale·CSD(i, c) + shift`` (``closed_form_sampled_distance``), ``p(m | i, c) = sigmoid(l)``, and the
    binary cross-entropy ``BCE(l, m)`` (``F.binary_cross_entropy_with_logits``, i.e. softplus form) averaged over
    the P·C pairs, m = 1 when c is a caption of i. The official code doubles it (its i2t and t2i copies are the same
    number, pcme#3); so do we: ``main = 2·BCE(l, m)``. Pseudo-positives (``pseudo_positive_labels``, from detached
    logits): ``pseudo = BCE(l, m̃_i2t) + BCE(lᵀ, m̃_t2i)``, with m̃ computed image-wise (rows) and caption-wise
    (columns). Total: ``main + pseudo_positive_weight·pseudo``.

    Args:
        img_mean, img_std: ``[P, D]`` μ and σ of the images. txt_mean, txt_std: ``[C, D]`` of the captions.
        caption_to_image: ``[C]`` long, image of each caption.
        scale: α > 0 (learnable). shift: β (learnable).
        pseudo_positive_weight: PCME++'s smoothness α_pp (0.1); 0 skips the term.

    Returns:
        (total, main, pseudo) scalars; ``pseudo`` is 0 when its weight is 0.
    """
    P, D = img_mean.shape
    C = txt_mean.shape[0]
    if caption_to_image.shape != (C,):
        raise ValueError(f"caption_to_image must be [C] = [{C}], got {tuple(caption_to_image.shape)}")
    csd = closed_form_sampled_distance(_wide(img_mean), _wide(img_std), _wide(txt_mean), _wide(txt_std))  # [P, C]
    logits = -scale * csd + shift  # [P, C]
    images = torch.arange(P, device=logits.device)
    matched = caption_to_image.to(logits.device)[None, :] == images[:, None]  # [P, C]
    main = 2.0 * F.binary_cross_entropy_with_logits(logits, matched.to(logits.dtype))
    pseudo = logits.new_zeros(())
    if pseudo_positive_weight > 0:
        detached = logits.detach()
        i2t = pseudo_positive_labels(detached, matched)  # [P, C]
        t2i = pseudo_positive_labels(detached.T, matched.T)  # [C, P]
        pseudo = F.binary_cross_entropy_with_logits(logits, i2t) + F.binary_cross_entropy_with_logits(logits.T, t2i)
    return main + pseudo_positive_weight * pseudo, main, pseudo


# ------------------------------------------------------------------------------------------------ MaxMatch (M§4.5)


def global_discriminative_loss(elements: Tensor, global_embedding: Tensor, margin: float = 0.0) -> Tensor:
    """MaxMatch Global Discriminative Loss, OUR STAND-IN (M§4.5: no code or formula was released).

    ``mean_{b,k} [cos(s_k, ĝ) − margin]_+``: pushes each set element away from its own set's global embedding.

    Args:
        elements: ``[B, K, D]`` set elements (normalised inside).
        global_embedding: ``[B, D]`` global embedding ĝ (normalised inside).
        margin: γ, cosines below it cost nothing.

    Returns:
        scalar tensor.
    """
    _check_sets("global_discriminative_loss", elements)
    B, K, D = elements.shape
    if global_embedding.shape != (B, D):
        raise ValueError(f"global_embedding must be [B, D] = [{B}, {D}], got {tuple(global_embedding.shape)}")
    s = F.normalize(_wide(elements), dim=-1)
    g = F.normalize(_wide(global_embedding), dim=-1)
    cos = torch.einsum("bkd,bd->bk", s, g)  # [B, K]
    return F.relu(cos - margin).mean()


def intra_set_divergence_loss(elements: Tensor) -> Tensor:
    """MaxMatch Intra-Set Divergence Loss, OUR STAND-IN (M§4.5): mean off-diagonal ``cos²`` within each set.

    Args:
        elements: ``[B, K, D]`` set elements (normalised inside).

    Returns:
        scalar tensor; 0 for K = 1 and for orthogonal elements.
    """
    _check_sets("intra_set_divergence_loss", elements)
    B, K, D = elements.shape
    if K < 2:
        return elements.new_zeros((), dtype=_wide(elements).dtype)
    s = F.normalize(_wide(elements), dim=-1)
    cos = s @ s.transpose(1, 2)  # [B, K, K]
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=elements.device)
    return cos[:, off_diagonal].pow(2).mean()


# ---------------------------------------------------------------------------------------------------------- modules


def _set_elements(out: SetOutput) -> Tensor:
    """Pre-global elements when the head provides them, else the final embeddings."""
    return out.elements if out.elements is not None else out.embeddings


@LOSSES.register("triplet")
class TripletSetLoss(nn.Module):
    """Triplet loss on a set similarity plus optional DivE / PVSE / MMD / MaxMatch terms (M§4.1-4.3, M§4.5).

    ``loss = triplet + diversity_weight·diversity + mmd_weight·mmd + global_discriminative_weight·gdl +
    intra_set_divergence_weight·isdl``. A term is computed only when its weight is > 0 (and, for diversity, when
    ``diversity != "none"``); disabled terms are reported as 0. Diversity (``dive``: ``diversity_loss``, ``gram``:
    ``gram_diversity_loss``), GDL and ISDL use ``SetOutput.elements`` (falling back to ``embeddings`` when a head
    gives none) and are summed over both modalities; MMD pools the final embeddings of the batch,
    X = P·K image elements and Y = C·L caption elements.

    Args:
        similarity: a name from ``setemb.similarity`` (``list_similarities()``).
        similarity_kwargs: extra kwargs of that similarity (e.g. ``{"alpha": 16.0}``).
        margin: triplet margin δ.
        hardest_negatives: max-violation mining; ``set_hardest_negatives(False)`` gives the no-mining warm-up.
        diversity: ``"none"``, ``"dive"`` or ``"gram"``.
        diversity_weight, mmd_weight, global_discriminative_weight, intra_set_divergence_weight: term weights.
        mmd_kernel: ``"rbf"`` or ``"official"`` (see ``mmd_loss``); mmd_gamma: its γ.
        global_discriminative_margin: γ of the GDL stand-in.
    """

    def __init__(
        self,
        similarity: str = "smooth_chamfer",
        similarity_kwargs: dict[str, Any] | None = None,
        margin: float = 0.2,
        hardest_negatives: bool = True,
        diversity: Literal["none", "dive", "gram"] = "none",
        diversity_weight: float = 0.0,
        mmd_weight: float = 0.0,
        mmd_kernel: Literal["rbf", "official"] = "rbf",
        mmd_gamma: float = 0.5,
        global_discriminative_weight: float = 0.0,
        global_discriminative_margin: float = 0.0,
        intra_set_divergence_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if diversity not in ("none", "dive", "gram"):
            raise ValueError(f"diversity must be 'none', 'dive' or 'gram', got {diversity!r}")
        if mmd_kernel not in ("rbf", "official"):
            raise ValueError(f"mmd_kernel must be 'rbf' or 'official', got {mmd_kernel!r}")
        self.similarity_name = similarity
        self._similarity_kwargs = dict(similarity_kwargs or {})
        self.similarity = create_similarity(similarity, **self._similarity_kwargs)
        self.margin = margin
        self.hardest_negatives = hardest_negatives
        self.diversity = diversity
        self.diversity_weight = diversity_weight
        self.mmd_weight = mmd_weight
        self.mmd_kernel = mmd_kernel
        self.mmd_gamma = mmd_gamma
        self.global_discriminative_weight = global_discriminative_weight
        self.global_discriminative_margin = global_discriminative_margin
        self.intra_set_divergence_weight = intra_set_divergence_weight

    def similarity_kwargs(self) -> dict[str, Any]:
        """The kwargs to pass to ``create_similarity(self.similarity_name, ...)`` at evaluation."""
        return dict(self._similarity_kwargs)

    def set_hardest_negatives(self, flag: bool) -> None:
        """Switch hardest-negative mining on (default) or off (the "no mining" warm-up epoch, M§4.1)."""
        self.hardest_negatives = flag

    def forward(self, img: SetOutput, txt: SetOutput, caption_to_image: Tensor) -> dict[str, Tensor]:
        """Args: img with embeddings ``[P, K, D]``, txt with embeddings ``[C, L, D]``, caption_to_image ``[C]``.

        Returns:
            ``{"loss": total, "triplet", "diversity", "mmd", "global_discriminative", "intra_set_divergence"}``,
            all components detached and unweighted.
        """
        _check_sets("TripletSetLoss (img.embeddings)", img.embeddings)
        _check_sets("TripletSetLoss (txt.embeddings)", txt.embeddings)
        P, K, D = img.embeddings.shape
        C, L, _ = txt.embeddings.shape
        sims = self.similarity(img.embeddings, txt.embeddings)  # [P, C]
        triplet = triplet_loss(sims, caption_to_image, margin=self.margin, hardest=self.hardest_negatives)
        zero = triplet.new_zeros(())
        total = triplet
        parts = {
            "triplet": triplet,
            "diversity": zero,
            "mmd": zero,
            "global_discriminative": zero,
            "intra_set_divergence": zero,
        }
        if self.diversity != "none" and self.diversity_weight > 0:
            fn = diversity_loss if self.diversity == "dive" else gram_diversity_loss
            parts["diversity"] = fn(_set_elements(img)) + fn(_set_elements(txt))
            total = total + self.diversity_weight * parts["diversity"]
        if self.mmd_weight > 0:
            x = img.embeddings.reshape(P * K, D)  # [P*K, D]
            y = txt.embeddings.reshape(C * L, D)  # [C*L, D]
            parts["mmd"] = mmd_loss(x, y, kernel=self.mmd_kernel, gamma=self.mmd_gamma)
            total = total + self.mmd_weight * parts["mmd"]
        if self.global_discriminative_weight > 0:
            for out, side in ((img, "img"), (txt, "txt")):
                if out.global_embedding is None:
                    raise ValueError(f"global_discriminative_weight > 0 needs {side}.global_embedding [B, D], got None")
            parts["global_discriminative"] = global_discriminative_loss(
                _set_elements(img), img.global_embedding, self.global_discriminative_margin
            ) + global_discriminative_loss(_set_elements(txt), txt.global_embedding, self.global_discriminative_margin)
            total = total + self.global_discriminative_weight * parts["global_discriminative"]
        if self.intra_set_divergence_weight > 0:
            parts["intra_set_divergence"] = intra_set_divergence_loss(_set_elements(img)) + intra_set_divergence_loss(
                _set_elements(txt)
            )
            total = total + self.intra_set_divergence_weight * parts["intra_set_divergence"]
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}


@LOSSES.register("pcme")
class ProbabilisticMatchingLoss(nn.Module):
    """PCME criterion (M§4.4): soft contrastive + ``kl_weight``·KL + ``uniformity_weight``·uniformity.

    Holds PCME's learnable scalars as registered parameters (DivE's code lost its a, b to ``.cuda()``): ``log_scale``
    (a = exp(log_scale) > 0, learnt in log space per house style) and ``shift`` (b), initialised to PCME's 15 / 15.
    The match logit is PCME's ``σ₂(−a d + b) = sigmoid(−2a d + 2b)``, so ``similarity_kwargs()`` returns
    ``{"scale": 2a, "shift": 2b}`` for ``match_probability``'s plain-sigmoid convention.

    Args:
        init_scale: initial a (PCME: 15 COCO, 5 CUB).
        init_shift: initial b.
        kl_weight: weight of the KL term (1e-5 COCO, 1e-3 CUB), applied to image + text KL.
        uniformity_weight: weight of the uniformity term over all samples of the batch (0 COCO, 10 CUB).
    """

    similarity_name = "match_probability"

    def __init__(
        self,
        init_scale: float = 15.0,
        init_shift: float = 15.0,
        kl_weight: float = 1e-5,
        uniformity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))
        self.kl_weight = kl_weight
        self.uniformity_weight = uniformity_weight

    @property
    def scale(self) -> Tensor:
        """PCME's a, ``exp(log_scale)``."""
        return self.log_scale.exp()

    def similarity_kwargs(self) -> dict[str, float]:
        """Current ``{scale, shift}`` in ``match_probability``'s convention (sigmoid(−scale·d + shift)).

        ``log: True``: evaluation ranks by log match probability, which never underflows (see ``match_probability``).
        """
        return {"scale": float(2.0 * self.scale.detach()), "shift": float(2.0 * self.shift.detach()), "log": True}

    def forward(self, img: SetOutput, txt: SetOutput, caption_to_image: Tensor) -> dict[str, Tensor]:
        """Args: img / txt with samples in ``embeddings [P, J, D]`` / ``[C, J, D]`` and ``mean``, ``logsigma [*, D]``.

        Returns:
            ``{"loss", "soft_contrastive", "kl", "uniformity", "scale", "shift"}``, components detached.
        """
        for out, side in ((img, "img"), (txt, "txt")):
            if out.mean is None or out.logsigma is None:
                raise ValueError(f"pcme loss needs {side}.mean and {side}.logsigma [B, D], got None")
        soft = soft_contrastive_loss(
            img.embeddings, txt.embeddings, caption_to_image, scale=2.0 * self.scale, shift=2.0 * self.shift
        )
        zero = soft.new_zeros(())
        total = soft
        kl = kl_divergence_loss(img.mean, img.logsigma) + kl_divergence_loss(txt.mean, txt.logsigma)
        if self.kl_weight > 0:
            total = total + self.kl_weight * kl
        uniformity = zero
        if self.uniformity_weight > 0:
            D = img.embeddings.shape[-1]
            samples = torch.cat([img.embeddings.reshape(-1, D), txt.embeddings.reshape(-1, D)])  # [(P+C)*J, D]
            uniformity = uniformity_loss(samples)
            total = total + self.uniformity_weight * uniformity
        parts = {"soft_contrastive": soft, "kl": kl, "uniformity": uniformity, "scale": self.scale, "shift": self.shift}
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}


@LOSSES.register("pcmepp")
class ClosedFormSampledDistanceLoss(nn.Module):
    """PCME++ criterion (Chun, ICLR 2024; M§4.4b): CSD matching loss + pseudo-positives + VIB (KL to N(0, I)).

    ``loss = csd_matching_loss(...) + vib_weight · (KL_img + KL_txt) / D`` where KL is ``kl_divergence_loss`` (σ read
    as a standard deviation) divided by D, i.e. averaged over dimensions as the official VIB term is. The learnable
    α (``scale``, learnt in log space per house style, init 5) and β (``shift``, init 5) are PCME++'s
    ``init_negative_scale`` / ``init_shift``. Needs the probabilistic head with ``output: mean_std`` (it reads
    ``SetOutput.mean`` and ``logsigma``); evaluation ranks by ``csd`` (α, β do not change a ranking).

    Mixed-sample augmentation (PCME++'s mixup / cutmix on pixels with softened labels) is not applied: features are
    cached, and a mix of two cached grids is not the feature of a mixed image. Size augmentation (``token_drop``)
    is, as in PCME++ (img/txt size augment 0.2).

    Args:
        init_scale: initial α (> 0). init_shift: initial β.
        vib_weight: β_VIB (PCME++: 1e-4). pseudo_positive_weight: α_pp (PCME++ "smoothness_alpha": 0.1).
    """

    similarity_name = "csd"

    def __init__(
        self,
        init_scale: float = 5.0,
        init_shift: float = 5.0,
        vib_weight: float = 1e-4,
        pseudo_positive_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if vib_weight < 0 or pseudo_positive_weight < 0:
            raise ValueError(
                f"weights must be >= 0, got vib_weight={vib_weight}, pseudo_positive_weight={pseudo_positive_weight}"
            )
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))
        self.vib_weight = vib_weight
        self.pseudo_positive_weight = pseudo_positive_weight

    @property
    def scale(self) -> Tensor:
        """α, ``exp(log_scale)``."""
        return self.log_scale.exp()

    def similarity_kwargs(self) -> dict[str, Any]:
        """``csd`` needs no learnt value: ``sigmoid(−α·CSD + β)`` is monotone in −CSD."""
        return {}

    def forward(self, img: SetOutput, txt: SetOutput, caption_to_image: Tensor) -> dict[str, Tensor]:
        """Args: img / txt with ``mean``, ``logsigma`` ``[P, D]`` / ``[C, D]``.

        Returns:
            ``{"loss", "matching", "pseudo_positive", "kl", "scale", "shift"}``, components detached.
        """
        for out, side in ((img, "img"), (txt, "txt")):
            if out.mean is None or out.logsigma is None:
                raise ValueError(f"pcmepp loss needs {side}.mean and {side}.logsigma [B, D], got None")
        total, main, pseudo = csd_matching_loss(
            img.mean,
            img.logsigma.exp(),
            txt.mean,
            txt.logsigma.exp(),
            caption_to_image,
            scale=self.scale,
            shift=self.shift,
            pseudo_positive_weight=self.pseudo_positive_weight,
        )
        D = img.mean.shape[-1]
        kl = (kl_divergence_loss(img.mean, img.logsigma) + kl_divergence_loss(txt.mean, txt.logsigma)) / D
        if self.vib_weight > 0:
            total = total + self.vib_weight * kl
        parts = {"matching": main, "pseudo_positive": pseudo, "kl": kl, "scale": self.scale, "shift": self.shift}
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}


def list_losses() -> list[str]:
    """Registered loss names."""
    return LOSSES.list()


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered as ``name`` (``triplet``, ``pcme``, ``pcmepp``) with ``kwargs``."""
    return LOSSES.create(name, **kwargs)
