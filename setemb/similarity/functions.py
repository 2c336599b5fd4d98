"""The public set-to-set similarities (M§3; DivE eq. 6-8; PCME; PCME++; MaxMatch), their checks and registry.

Each function checks its inputs, prepares both batches with its kernel (``kernels``) and scores them in one go;
``create_similarity(name, **kw)`` binds hyper-parameters (checked), ``score`` (``scoring``) tiles large batches.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from setemb.registry import Registry
from setemb.similarity.kernels import _KERNELS, _compute_dtype

SIMILARITIES: Registry[Callable[..., Tensor]] = Registry("similarity")

# ----------------------------------------------------------------------------------------------- validation


def _is_bool(mask: Any) -> bool:
    return mask.dtype == torch.bool if isinstance(mask, Tensor) else np.dtype(mask.dtype) == np.bool_


def _check_sets(name: str, x: Any, mask: Any, width: int | None = None) -> None:
    shape = tuple(x.shape)
    if len(shape) != 3:
        raise ValueError(f"{name}: expected a batch of sets [N, K, D], got shape {shape}")
    if width is not None and shape[2] != width:
        raise ValueError(f"{name}: expected element width D={width} (from the other input), got shape {shape}")
    if mask is not None:
        if tuple(mask.shape) != shape[:2]:
            raise ValueError(f"{name} mask: expected shape {shape[:2]} ([N, K] of {name}), got {tuple(mask.shape)}")
        if not _is_bool(mask):
            raise ValueError(f"{name} mask: expected dtype bool (True = valid element), got {mask.dtype}")


_POSITIVE_KWARGS = {"smooth_chamfer": ("alpha",), "pair_assignment": ("tau", "iterations")}
_FUNCTIONS: dict[str, Callable[..., Tensor]] = {}  # name -> public function
_NAME_OF: dict[Callable[..., Tensor], str] = {}  # public function -> name


def _resolve_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters of ``name`` with defaults filled in; unknown keys or non-positive values -> ValueError."""
    params = inspect.signature(_FUNCTIONS[name]).parameters.values()
    resolved = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(kwargs) - set(resolved))
    if unknown:
        raise ValueError(f"similarity {name!r} got unknown kwargs {unknown}; known: {sorted(resolved)}")
    resolved.update(kwargs)
    for key in _POSITIVE_KWARGS.get(name, ()):
        value = resolved[key]
        if not isinstance(value, Tensor) and not value > 0:  # tensors (learnt) are not checked: no host sync
            raise ValueError(f"similarity {name!r}: {key} must be > 0, got {value}")
    return resolved


def _apply(name: str, a: Tensor, b: Tensor, a_mask: Tensor | None, b_mask: Tensor | None, **kw: Any) -> Tensor:
    kw = _resolve_kwargs(name, kw)
    _check_sets("a", a, a_mask)
    _check_sets("b", b, b_mask, width=a.shape[2])
    kernel = _KERNELS[name]
    dtype = _compute_dtype(a.dtype, b.dtype)
    N, Ka, _ = a.shape
    M, Kb, _ = b.shape
    if N == 0 or M == 0 or Ka == 0 or Kb == 0:  # zero-length sets are empty sets
        return torch.full((N, M), float("-inf"), dtype=dtype, device=a.device)
    pa = kernel.prepare(a, None if a_mask is None else a_mask.to(a.device), dtype, False)
    pb = kernel.prepare(b, None if b_mask is None else b_mask.to(b.device), dtype, True)
    return kernel.pair(pa, pb, **kw)


def _registered(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register ``fn`` so that ``create_similarity(name, **kw)`` returns ``partial(fn, **kw)`` (kwargs checked)."""

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _FUNCTIONS[name] = fn
        _NAME_OF[fn] = name

        def build(**kwargs: Any) -> Callable[..., Tensor]:
            _resolve_kwargs(name, kwargs)
            return functools.partial(fn, **kwargs)

        SIMILARITIES.register(name)(build)
        return fn

    return decorator


# ----------------------------------------------------------------------------------------------- public similarities


@_registered("smooth_chamfer")
def smooth_chamfer(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None, *,
                   alpha: float | Tensor = 16.0) -> Tensor:  # fmt: skip
    """Smooth-Chamfer similarity, DivE eq. 6-7 (M§3).

    ``s = 1/(2α) · [ (1/Ka) Σ_i LSE_j(α C_ij) + (1/Kb) Σ_j LSE_i(α C_ij) ]`` with ``C_ij = cos(a_i, b_j)``; with
    masks, means and LSEs run over valid elements. ``chamfer ≤ s ≤ chamfer + log(max(Ka, Kb))/α``; as α → 0,
    ``s − (log Ka + log Kb)/(2α) → mean_ij C_ij``. Its gradient w.r.t. ``C_ij`` is DivE eq. 8,
    ``softmax_j(α C_i·)_j / (2Ka) + softmax_i(α C_·j)_i / (2Kb)``.

    Computed with ``torch.logsumexp`` (stable for any α, e.g. 1e4) when autograd is needed or α > 64; otherwise with
    one in-place ``exp`` of the GEMM output (exact, since |αC| ≤ 64 cannot over- or underflow float32).

    Args:
        a: [N, Ka, D] float (any float dtype; normalised inside, computed in float32 or float64).
        b: [M, Kb, D] float.
        a_mask: [N, Ka] bool, True = valid element, or None. b_mask: [M, Kb] bool or None.
        alpha: temperature α > 0 (DivE: 16).

    Returns:
        [N, M] float32 (float64 for float64 inputs); ``-inf`` where a set has no valid element.
    """
    return _apply("smooth_chamfer", a, b, a_mask, b_mask, alpha=alpha)


@_registered("chamfer")
def chamfer(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None) -> Tensor:
    """Chamfer similarity, the α → ∞ limit of DivE eq. 7 (M§3): ``½[mean_i max_j C_ij + mean_j max_i C_ij]``.

    Args:
        a: [N, Ka, D] float. b: [M, Kb, D] float. a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.

    Returns:
        [N, M] float32 (or float64); ``-inf`` for empty sets.
    """
    return _apply("chamfer", a, b, a_mask, b_mask)


@_registered("max_similarity")
def max_similarity(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None) -> Tensor:
    """PVSE multiple-instance (MIL) similarity (M§3, M§4.3): the best pair, ``max_ij C_ij``.

    Args:
        a: [N, Ka, D] float. b: [M, Kb, D] float. a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.

    Returns:
        [N, M] float32 (or float64); ``-inf`` for empty sets.
    """
    return _apply("max_similarity", a, b, a_mask, b_mask)


@_registered("mean_similarity")
def mean_similarity(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None) -> Tensor:
    """Mean cosine over all element pairs (M§3 "mean"), ``mean_ij C_ij``.

    Computed exactly as ``<mean_i â_i, mean_j b̂_j>`` of the normalised elements (O(D) per pair instead of
    O(Ka·Kb·D)).

    Args:
        a: [N, Ka, D] float. b: [M, Kb, D] float. a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.

    Returns:
        [N, M] float32 (or float64); ``-inf`` for empty sets.
    """
    return _apply("mean_similarity", a, b, a_mask, b_mask)


@_registered("match_probability")
def match_probability(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None, *,
                      scale: float | Tensor = 1.0, shift: float | Tensor = 0.0,
                      log: bool = False) -> Tensor:  # fmt: skip
    """PCME match probability (M§3.2): ``mean_ij sigmoid(−scale·‖a_i − b_j‖₂ + shift)``.

    Unlike the other similarities this uses the raw Euclidean distance of the *un-normalised* elements, since PCME
    samples ``z = μ + σ ⊙ ε`` are not renormalised. PCME writes ``σ₂(−a d + b)`` with ``σ₂(l) = sigmoid(2l)``: pass
    ``scale = 2a, shift = 2b`` to get it. The defaults (1, 0) are neutral placeholders; the PCME loss supplies its
    learnt values. ``scale`` and ``shift`` may be tensors (learnt, differentiable).

    Args:
        a: [N, Ka, D] float samples. b: [M, Kb, D] float samples.
        a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.
        scale: slope on the distance (PCME 2a). shift: offset (PCME 2b).
        log: return ``log p`` via logsigmoid + logsumexp. Same ranking as ``p``, but ``p`` underflows to exactly 0 in
            float32 once ``scale·d − shift`` exceeds ~104 (far samples, large learnt scale), which would tie every
            such pair; evaluation of a PCME model therefore ranks by ``log p``.

    Returns:
        [N, M] float32 (or float64) in (0, 1), or ``log p`` in (-inf, 0) with ``log=True``; ``-inf`` for empty sets.
    """
    return _apply("match_probability", a, b, a_mask, b_mask, scale=scale, shift=shift, log=log)


@_registered("pair_assignment")
def pair_assignment(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None, *,
                    tau: float = 0.05, iterations: int = 20, exact: bool | None = None) -> Tensor:  # fmt: skip
    """MaxMatch one-to-one pair assignment (M§3.3). **Our documented assumption**: MaxMatch released no code.

    Exact (evaluation): ``s = (1/p) max_π Σ_i C_{i,π(i)}`` over one-to-one assignments of ``p = min(Ka, Kb)`` pairs
    (with masks, ``p = min(#valid a, #valid b)`` and only valid elements are assigned). Rectangular and masked sets
    are padded to a square with a constant that forces exactly ``p`` real pairs, then solved by batched brute force
    over permutations for max(Ka, Kb) ≤ 6 (first maximum wins on ties), or ``scipy.optimize.linear_sum_assignment``
    pair by pair above that (slow). Relaxed (training): log-domain Sinkhorn on ``Z = C/τ`` (``sinkhorn``), then
    ``s = Σ_ij P_ij C_ij / p`` over real pairs; it tends to the exact value as τ → 0 on tie-free inputs.

    Args:
        a: [N, Ka, D] float. b: [M, Kb, D] float. a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.
        tau: Sinkhorn temperature τ > 0. iterations: Sinkhorn iterations (row then column normalisation).
        exact: True = exact assignment, False = Sinkhorn, None = exact unless autograd needs a gradient.

    Returns:
        [N, M] float32 (or float64); ``-inf`` for empty sets.
    """
    return _apply("pair_assignment", a, b, a_mask, b_mask, tau=tau, iterations=iterations, exact=exact)


def closed_form_sampled_distance(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor) -> Tensor:
    """PCME++ closed-form sampled distance (Chun, ICLR 2024, eq. 1-2; M§4.4b) of all pairs of diagonal Gaussians.

    ``CSD(a, b) = E‖Z_a − Z_b‖² = ‖μ_a − μ_b‖² + Σ_d σ_{a,d}² + Σ_d σ_{b,d}²`` for independent
    ``Z_a ~ N(μ_a, diag σ_a²)``, ``Z_b ~ N(μ_b, diag σ_b²)``: the expected squared distance of one sample of each,
    in closed form (PCME's Monte-Carlo estimate of the match probability becomes unnecessary).

    Args:
        mu_a: [N, D] means; sigma_a: [N, D] standard deviations (>= 0).
        mu_b: [M, D]; sigma_b: [M, D].

    Returns:
        [N, M] CSD >= 0 (a distance: smaller = more similar), in the inputs' dtype (float32 for half inputs).
    """
    if mu_a.ndim != 2 or mu_a.shape != sigma_a.shape or mu_b.ndim != 2 or mu_b.shape != sigma_b.shape:
        raise ValueError(
            f"closed_form_sampled_distance expects mu/sigma [N, D] and [M, D] pairs, got {tuple(mu_a.shape)}, "
            f"{tuple(sigma_a.shape)}, {tuple(mu_b.shape)}, {tuple(sigma_b.shape)}"
        )
    if mu_a.shape[1] != mu_b.shape[1]:
        raise ValueError(f"closed_form_sampled_distance: widths differ, {mu_a.shape[1]} vs {mu_b.shape[1]}")
    dtype = _compute_dtype(mu_a.dtype, mu_b.dtype)
    mu_a, sigma_a, mu_b, sigma_b = (t.to(dtype) for t in (mu_a, sigma_a, mu_b, sigma_b))
    d2 = (mu_a.square().sum(-1)[:, None] + mu_b.square().sum(-1)[None, :] - 2.0 * mu_a @ mu_b.T).clamp_min(0.0)
    return d2 + sigma_a.square().sum(-1)[:, None] + sigma_b.square().sum(-1)[None, :]  # [N, M]


@_registered("csd")
def csd_similarity(a: Tensor, b: Tensor, a_mask: Tensor | None = None, b_mask: Tensor | None = None, *,
                   use_sigma: bool = True) -> Tensor:  # fmt: skip
    """PCME++ similarity: the negated closed-form sampled distance, ``−CSD`` (``closed_form_sampled_distance``).

    Each "set" is a PCME++ item as the probabilistic head emits it with ``output="mean_std"``: ``[N, 2, D]`` with
    row 0 the mean μ and row 1 the standard deviation σ. ``s(a, b) = −(‖μ_a − μ_b‖² + Σσ_a² + Σσ_b²)``, so a larger
    score is more similar (house rule) and the ranking is PCME++'s "evaluation by CSD". PCME++'s match probability
    ``sigmoid(−α·CSD + β)`` (α > 0) is a monotone function of it, so α and β are not needed to rank. With
    ``use_sigma=False`` it is ``−‖μ_a − μ_b‖²``, PCME++'s "μ only" evaluation (= ``2·cos − 2`` for unit-norm μ).
    Raw (un-normalised) rows; computed with one GEMM per tile, ``s = 2 μ_a·μ_b − (‖μ_a‖² + Σσ_a²) − (‖μ_b‖² + Σσ_b²)``.

    Args:
        a: [N, 2, D] (μ, σ) pairs. b: [M, 2, D].
        a_mask, b_mask: None or all True ([N, 2] / [M, 2]); a pair is never partly valid.
        use_sigma: include the Σσ² terms (default) or rank by the means alone.

    Returns:
        [N, M] float32 (float64 for float64 inputs), ≤ 0.
    """
    return _apply("csd", a, b, a_mask, b_mask, use_sigma=use_sigma)


def list_similarities() -> list[str]:
    """Registered similarity names, sorted."""
    return SIMILARITIES.list()


def create_similarity(name: str, **kwargs: Any) -> Callable[..., Tensor]:
    """``(a [N, Ka, D], b [M, Kb, D], a_mask=None, b_mask=None) -> [N, M]`` for ``name`` with hyper-parameters bound.

    Unknown names or kwargs raise ``ValueError``; ``None`` kwargs are dropped so defaults apply.
    """
    return SIMILARITIES.create(name, **kwargs)
