"""setemb: set-based image-text embeddings (DivE, CVPR 2023) and the systems it is compared with.

The stable API is re-exported here; everything else lives in its module. This package imports only torch, numpy,
einops, scipy, faiss and zarr: no Ray, DVC, Typer or pydantic (those are the pipeline's).
"""

from setemb.embedding_store import EmbeddingStore
from setemb.encoders import create_encoder, list_encoders
from setemb.feature_store import FeatureStore
from setemb.heads import SetOutput, create_head, list_heads
from setemb.losses import ProbabilisticMatchingLoss, TripletSetLoss, create_loss, list_losses
from setemb.metrics import (
    circular_variance,
    five_fold_1k,
    log_mean_circular_variance,
    map_at_r,
    r_precision,
    recall_at_k,
    recall_at_k_streaming,
)
from setemb.model import SetEmbeddingModel, Tower, create_model, param_groups
from setemb.similarity import (
    chamfer,
    create_similarity,
    list_similarities,
    match_probability,
    max_similarity,
    mean_similarity,
    pair_assignment,
    score,
    smooth_chamfer,
)

__all__ = [
    "EmbeddingStore",
    "FeatureStore",
    "ProbabilisticMatchingLoss",
    "SetEmbeddingModel",
    "SetOutput",
    "Tower",
    "TripletSetLoss",
    "chamfer",
    "circular_variance",
    "create_encoder",
    "create_head",
    "create_loss",
    "create_model",
    "create_similarity",
    "five_fold_1k",
    "list_encoders",
    "list_heads",
    "list_losses",
    "list_similarities",
    "log_mean_circular_variance",
    "map_at_r",
    "match_probability",
    "max_similarity",
    "mean_similarity",
    "pair_assignment",
    "param_groups",
    "r_precision",
    "recall_at_k",
    "recall_at_k_streaming",
    "score",
    "smooth_chamfer",
]
