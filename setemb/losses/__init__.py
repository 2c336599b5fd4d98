"""Training losses: triplet with several positives, DivE / PVSE / PCME / MaxMatch regularisers (M§4).

Batch layout (M§4.1): P images and all their C captions; ``caption_to_image [C] long`` maps caption c to its image
``0..P-1`` and the similarity matrix is ``sims [P, C]``. The functions take plain tensors; the modules registered in
``LOSSES`` (``create_loss``) read ``SetOutput`` fields and return ``{"loss": total, <component>: detached}``.

Modules: ``common`` (the ``LOSSES`` registry, ``create_loss``, shared numeric helpers), ``triplet`` (triplet, DivE /
PVSE / MaxMatch regularisers, ``TripletSetLoss``), ``probabilistic`` (PCME and PCME++ terms and modules).
"""

from setemb.losses.common import LOSSES, create_loss, list_losses
from setemb.losses.probabilistic import (
    PCME_KL_WEIGHT,
    ClosedFormSampledDistanceLoss,
    ProbabilisticMatchingLoss,
    csd_matching_loss,
    kl_divergence_loss,
    pseudo_positive_labels,
    soft_contrastive_loss,
    uniformity_loss,
)
from setemb.losses.triplet import (
    TripletSetLoss,
    diversity_loss,
    global_discriminative_loss,
    gram_diversity_loss,
    intra_set_divergence_loss,
    mmd_loss,
    triplet_loss,
)

__all__ = [
    "LOSSES",
    "PCME_KL_WEIGHT",
    "ClosedFormSampledDistanceLoss",
    "ProbabilisticMatchingLoss",
    "TripletSetLoss",
    "create_loss",
    "csd_matching_loss",
    "diversity_loss",
    "global_discriminative_loss",
    "gram_diversity_loss",
    "intra_set_divergence_loss",
    "kl_divergence_loss",
    "list_losses",
    "mmd_loss",
    "pseudo_positive_labels",
    "soft_contrastive_loss",
    "triplet_loss",
    "uniformity_loss",
]
