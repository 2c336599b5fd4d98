"""Probabilistic losses: PCME (soft contrastive, KL, uniformity; M§4.4), PCME++ (closed-form sampled distance; M§4.4b).

The modules ``ProbabilisticMatchingLoss`` (``pcme``) and ``ClosedFormSampledDistanceLoss`` (``pcmepp``) read the
probabilistic head's ``SetOutput`` (samples, or mean / std) and learn the match probability's scale and shift.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setemb.losses.common import LOSSES, _safe_sqrt, _squared_distances, _wide
from setemb.similarity import closed_form_sampled_distance

if TYPE_CHECKING:
    from setemb.heads import SetOutput


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
    positive of the same query become (soft) positives.

    PCME++ builds batches with one positive per query and labels ``m̃_rg = 1`` when ``logits_rg ≥ logits_r,gt``.
    Our batches hold every caption of each image, so an image row has several positives; the label is the
    *fraction of the row's positives* that entry g scores at least as well as,
    ``m̃_rg = (1/|pos(r)|) Σ_{p ∈ pos(r)} [logits_rg ≥ logits_rp]``, i.e. PCME++'s rule averaged over which positive
    would have been the batch's one (exactly PCME++'s rule when a row has one positive). Taking the least similar
    positive as the one threshold instead labels far more pairs (at initialisation 76% of all image-wise pairs on
    `shapes`, against 50% with one positive; docs/DESIGN.md). True positives keep 1; rows without a positive keep
    0. Not differentiable (labels); call it on detached logits. Memory ``[Q, G, max positives]``.

    Args:
        logits: ``[Q, G]`` match logits (larger = more similar), queries in rows.
        matched: ``[Q, G]`` bool ground truth.

    Returns:
        ``[Q, G]`` float labels in [0, 1].
    """
    if logits.shape != matched.shape or logits.ndim != 2:
        raise ValueError(
            f"pseudo_positive_labels expects logits and matched [Q, G], got {tuple(logits.shape)} and "
            f"{tuple(matched.shape)}"
        )
    counts = matched.sum(dim=1)  # [Q] positives per row
    M = max(int(counts.max()), 1) if counts.numel() else 1  # host sync: sizes the [Q, G, M] comparison
    # the row's positive logits, padded with +inf (never reached) to M per row
    positive_logits = logits.masked_fill(~matched, float("inf")).topk(M, dim=1, largest=False).values  # [Q, M]
    beaten = (logits[:, :, None] >= positive_logits[:, None, :]).sum(dim=-1)  # [Q, G] positives scored at most g's
    fraction = beaten.to(logits.dtype) / counts.clamp(min=1).to(logits.dtype)[:, None]  # [Q, G]
    return torch.where(matched, torch.ones_like(fraction), fraction)  # [Q, G]


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


def _require_gaussians(img: SetOutput, txt: SetOutput, loss: str) -> None:
    """Both sides carry the Gaussian a probabilistic loss reads (``mean``, ``logsigma [B, D]``)."""
    for out, side in ((img, "img"), (txt, "txt")):
        if out.mean is None or out.logsigma is None:
            raise ValueError(f"{loss} loss needs {side}.mean and {side}.logsigma [B, D], got None")


# PCME's COCO vib_beta (1e-5) in this module's averaged form: 1e-5 / (2 * 128), see ProbabilisticMatchingLoss
PCME_KL_WEIGHT = 1e-5 / (2 * 128)


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
        kl_weight: weight of the KL term, applied to image + text KL. PCME sums its NLL over the 2·B² pairs of a
            batch and its KL over B·D, while here the NLL is a mean over pairs and the KL a mean over the batch, so
            PCME's ``vib_beta`` corresponds to ``vib_beta / (2·B)``: the default 3.9e-8 is its COCO 1e-5 at its batch
            B = 128 (CUB 1e-3 -> 3.9e-6). With 1e-5 here the KL weighed 256x more and cost ~3 RSUM (docs/DESIGN.md).
        uniformity_weight: weight of the uniformity term over all samples of the batch (0 COCO, 10 CUB).
    """

    similarity_name = "match_probability"

    def __init__(
        self,
        init_scale: float = 15.0,
        init_shift: float = 15.0,
        kl_weight: float = PCME_KL_WEIGHT,
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
        _require_gaussians(img, txt, "pcme")
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

    Pseudo-positives start after ``pseudo_positive_warmup_epochs`` epochs (the training loop calls ``set_epoch``).
    They are read off the current embedding, and an untrained one ranks positives no better than negatives: at
    initialisation on `shapes` half of all pairs are labelled positive (6.7% truly are), a labelled pair with match
    probability p is pulled together whenever ``2p < α_pp(1 − p)`` (every pair at the start, where p ≈ 0), and a
    collapsed embedding labels every pair (ties), so the collapse sustains itself: RSUM 33 (chance ≈ 36) with them
    from step 0, 122 with a one-epoch warm-up and fractional labels (docs/DESIGN.md). PCME++ starts them at step 0
    from pre-trained CLIP.

    Args:
        init_scale: initial α (> 0). init_shift: initial β.
        vib_weight: β_VIB (PCME++: 1e-4). pseudo_positive_weight: α_pp (PCME++ "smoothness_alpha": 0.1).
        pseudo_positive_warmup_epochs: epochs trained without pseudo-positives (0: from the first step, as PCME++).
    """

    similarity_name = "csd"

    def __init__(
        self,
        init_scale: float = 5.0,
        init_shift: float = 5.0,
        vib_weight: float = 1e-4,
        pseudo_positive_weight: float = 0.1,
        pseudo_positive_warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if pseudo_positive_warmup_epochs < 0:
            raise ValueError(f"pseudo_positive_warmup_epochs must be >= 0, got {pseudo_positive_warmup_epochs}")
        if vib_weight < 0 or pseudo_positive_weight < 0:
            raise ValueError(
                f"weights must be >= 0, got vib_weight={vib_weight}, pseudo_positive_weight={pseudo_positive_weight}"
            )
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.shift = nn.Parameter(torch.tensor(float(init_shift)))
        self.vib_weight = vib_weight
        self.pseudo_positive_weight = pseudo_positive_weight
        self.pseudo_positive_warmup_epochs = pseudo_positive_warmup_epochs
        self.epoch = 0

    @property
    def scale(self) -> Tensor:
        """α, ``exp(log_scale)``."""
        return self.log_scale.exp()

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss which (0-based) epoch trains next: pseudo-positives are off before the warm-up ends."""
        self.epoch = epoch

    @property
    def active_pseudo_positive_weight(self) -> float:
        """α_pp now: 0 during the warm-up epochs, ``pseudo_positive_weight`` after."""
        return self.pseudo_positive_weight if self.epoch >= self.pseudo_positive_warmup_epochs else 0.0

    def similarity_kwargs(self) -> dict[str, Any]:
        """``csd`` needs no learnt value: ``sigmoid(−α·CSD + β)`` is monotone in −CSD."""
        return {}

    def forward(self, img: SetOutput, txt: SetOutput, caption_to_image: Tensor) -> dict[str, Tensor]:
        """Args: img / txt with ``mean``, ``logsigma`` ``[P, D]`` / ``[C, D]``.

        Returns:
            ``{"loss", "matching", "pseudo_positive", "kl", "scale", "shift"}``, components detached.
        """
        _require_gaussians(img, txt, "pcmepp")
        total, main, pseudo = csd_matching_loss(
            img.mean,
            img.logsigma.exp(),
            txt.mean,
            txt.logsigma.exp(),
            caption_to_image,
            scale=self.scale,
            shift=self.shift,
            pseudo_positive_weight=self.active_pseudo_positive_weight,
        )
        D = img.mean.shape[-1]
        kl = (kl_divergence_loss(img.mean, img.logsigma) + kl_divergence_loss(txt.mean, txt.logsigma)) / D
        if self.vib_weight > 0:
            total = total + self.vib_weight * kl
        parts = {"matching": main, "pseudo_positive": pseudo, "kl": kl, "scale": self.scale, "shift": self.shift}
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}
