"""Set-prediction heads: local features + global feature -> a set of embeddings (`SetOutput`).

Every head has ``forward(local [B, N, D_in], global_ [B, D], mask [B, N] bool (True = valid) | None) -> SetOutput``
and a constructor taking ``embed_dim`` (D), ``num_embeddings`` (K), ``input_dim`` (D_in, default D),
``device=None, dtype=None`` plus its own kwargs. Registered names (`list_heads()`):

- ``slot``: `SetPredictionModule`, the DivE set prediction module (DivE eq. 1-5, M§1).
- ``transformer``: `TransformerAttentionHead`, the same block with the softmax over inputs (DivE Table 3 ablation).
- ``pienet``: `PIENet` (PVSE eq. 2-4, M§4.3).
- ``probabilistic``: `ProbabilisticHead` (PCME, M§4.4; PCME++, M§4.4b); ``embeddings`` are J samples (not
  re-normalised) or PCME++'s (μ, σ) pair.
- ``single_vector``: `SingleVectorHead` (VSE++, M§4.6), K = 1.

Modules: ``common`` (``SetOutput``, the ``HEADS`` registry, ``create_head``), ``spm`` (``slot``, ``transformer`` and
their building blocks), ``pooled`` (``pienet``, ``probabilistic``, ``single_vector``).
"""

from setemb.heads.common import HEADS, SetOutput, create_head, list_heads
from setemb.heads.pooled import PIENet, ProbabilisticHead, SingleVectorHead
from setemb.heads.spm import (
    SetPredictionModule,
    TransformerAttentionHead,
    normalise_over_inputs,
    sine_encoding,
    sine_encoding_1d,
    sine_encoding_2d,
    slot_competition,
    softmax_over_inputs,
)

__all__ = [
    "HEADS",
    "PIENet",
    "ProbabilisticHead",
    "SetOutput",
    "SetPredictionModule",
    "SingleVectorHead",
    "TransformerAttentionHead",
    "create_head",
    "list_heads",
    "normalise_over_inputs",
    "sine_encoding",
    "sine_encoding_1d",
    "sine_encoding_2d",
    "slot_competition",
    "softmax_over_inputs",
]
