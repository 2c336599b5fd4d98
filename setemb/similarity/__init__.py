"""Set-to-set similarities (M§3; DivE eq. 6-8) and tiled scoring of queries against a gallery.

Every similarity takes two batches of sets, ``a [N, Ka, D]`` and ``b [M, Kb, D]`` (``Ka`` may differ from ``Kb``),
optional bool masks ``a_mask [N, Ka]`` / ``b_mask [M, Kb]`` (True = valid element), and returns ``[N, M]`` in float32
(float64 when an input is float64). Elements are compared by cosine: inputs are L2-normalised inside, in float32 even
for float16 / bfloat16 inputs. ``match_probability`` (PCME) and ``csd`` (PCME++, sets are (μ, σ) pairs) are the
exceptions: they compare raw, un-normalised rows (see there).

Masks and empty sets: reductions run over valid elements only. A set with no valid element scores ``-inf`` against
every set (for every similarity), so it never outranks a real set; its gradient is zero, never NaN.

All cosine-based similarities compute the element cosines of a whole tile with one GEMM
``[N*Ka, D] @ [D, Kb*M]``, viewed as ``[N, Ka, Kb, M]`` (the gallery side is stored element-major so both reductions
are over outer axes, which vectorise), and reduce over the element axes by name.

Modules: ``kernels`` (set preparation and the per-similarity tile kernels), ``functions`` (the public similarity
functions, input checks and the ``SIMILARITIES`` registry), ``scoring`` (``score``: tiles and streaming top-k).
"""

from setemb.similarity.functions import (
    SIMILARITIES,
    chamfer,
    closed_form_sampled_distance,
    create_similarity,
    csd_similarity,
    list_similarities,
    match_probability,
    max_similarity,
    mean_similarity,
    pair_assignment,
    smooth_chamfer,
)
from setemb.similarity.kernels import sinkhorn
from setemb.similarity.scoring import score

__all__ = [
    "SIMILARITIES",
    "chamfer",
    "closed_form_sampled_distance",
    "create_similarity",
    "csd_similarity",
    "list_similarities",
    "match_probability",
    "max_similarity",
    "mean_similarity",
    "pair_assignment",
    "score",
    "sinkhorn",
    "smooth_chamfer",
]
