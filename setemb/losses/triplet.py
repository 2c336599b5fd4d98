"""Triplet with several positives and the set regularisers that go with it: DivE / PVSE (M§4.1-4.3), MaxMatch (M§4.5).

``TripletSetLoss`` (``triplet``) scores image and caption sets with any registered similarity and adds the enabled
regularisers; the functions take plain tensors (batch layout: see ``setemb.losses``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setemb.losses.common import LOSSES, _check_sets, _safe_sqrt, _squared_distances, _wide
from setemb.similarity import create_similarity

if TYPE_CHECKING:
    from setemb.heads import SetOutput


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
