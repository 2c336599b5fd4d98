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
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from setemb.registry import Registry

logger = logging.getLogger(__name__)

SIMILARITIES: Registry[Callable[..., Tensor]] = Registry("similarity")

_LN2 = math.log(2.0)
# Largest alpha for which exp(alpha * C), C in [-1, 1], stays a normal float with room for sums (fast path).
_FAST_EXP_MAX_ALPHA = {torch.float32: 64.0, torch.float64: 600.0}
_EXACT_BRUTE_FORCE_MAX_K = 6  # 6! = 720 permutations; above that the exact path loops over scipy per pair.
_TILE_ELEMENTS = 1 << 24  # ~64 MB of float32 per tile in score(): few, large ops (robust on busy CPUs)
_SQRT_EPS = 1e-12  # clamp of squared distances before sqrt (finite gradient at d = 0)


class _Sets(NamedTuple):
    """A batch of sets prepared once for a kernel (normalised, cast, maybe reduced)."""

    x: Tensor  # [N, K, D] (cosine kernels; gallery side stored [K, N, D]) or [N, D] (mean_similarity)
    mask: Tensor | None  # [N, K] bool, True = valid
    count: Tensor  # [N] number of valid elements, compute dtype
    sq_norm: Tensor | None = None  # [N, K] squared norms (match_probability)

    def rows(self, start: int, stop: int) -> _Sets:
        """Sets ``start:stop`` (query side, stored [N, ...])."""
        return _Sets(*(None if t is None else t[start:stop] for t in self))

    @property
    def empty(self) -> Tensor:
        """[N] bool, True where the set has no valid element."""
        return self.count == 0


class _Workspace:
    """Reusable flat buffers for the no-autograd tile path of ``score``: a fresh tile of tens of MB per GEMM would be
    page-faulted in (and zeroed by the OS) every time."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


# ----------------------------------------------------------------------------------------------- preparation


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _count(x: Tensor, mask: Tensor | None) -> Tensor:
    N, K = x.shape[:2]
    if mask is None:
        return torch.full((N,), float(K), dtype=x.dtype, device=x.device)
    return mask.sum(1).to(x.dtype)  # [N]


def _element_major(x: Tensor, gallery: bool) -> Tensor:
    """Same values; the gallery side is stored [K, N, D] so the GEMM output reshapes to [N, Ka, Kb, M] for free."""
    return x.transpose(0, 1).contiguous().transpose(0, 1) if gallery else x.contiguous()


def _prepare_cosine(x: Tensor, mask: Tensor | None, dtype: torch.dtype, gallery: bool) -> _Sets:
    xn = F.normalize(x.to(dtype), dim=-1)  # [N, K, D]
    return _Sets(_element_major(xn, gallery), mask, _count(xn, mask))


def _prepare_mean(x: Tensor, mask: Tensor | None, dtype: torch.dtype, gallery: bool) -> _Sets:
    xn = F.normalize(x.to(dtype), dim=-1)  # [N, K, D]
    count = _count(xn, mask)
    if mask is not None:
        xn = xn * mask[:, :, None]
    return _Sets(xn.sum(1) / count.clamp_min(1)[:, None], mask, count)  # x: [N, D]


def _prepare_raw(x: Tensor, mask: Tensor | None, dtype: torch.dtype, gallery: bool) -> _Sets:
    x = x.to(dtype)  # [N, K, D], PCME samples are not renormalised
    return _Sets(_element_major(x, gallery), mask, _count(x, mask), x.square().sum(-1))


def _prepare_gaussian(x: Tensor, mask: Tensor | None, dtype: torch.dtype, gallery: bool) -> _Sets:
    """PCME++ (μ, σ) pairs ``[N, 2, D]`` -> x = μ ``[N, D]``, sq_norm = ``‖μ‖² + Σ_d σ_d²`` ``[N]``."""
    if x.shape[1] != 2:
        raise ValueError(f"csd_similarity expects (mean, std) pairs [N, 2, D], got shape {tuple(x.shape)}")
    if mask is not None and not bool(mask.all()):
        raise ValueError("csd_similarity compares whole (mean, std) pairs; masks must be all True")
    x = x.to(dtype)
    mu, sigma = x[:, 0], x[:, 1]  # [N, D], [N, D]
    return _Sets(mu.contiguous(), None, _count(x, None), mu.square().sum(-1) + sigma.square().sum(-1))


# ----------------------------------------------------------------------------------------------- shared pieces


def _cosine(a: _Sets, b: _Sets, scale: float | Tensor = 1.0, workspace: _Workspace | None = None) -> Tensor:
    """``scale * <a_i, b_j>`` for all element pairs: one GEMM, returned as ``[N, Ka, Kb, M]``."""
    N, Ka, D = a.x.shape
    M, Kb, _ = b.x.shape
    a2 = a.x.reshape(N * Ka, D)  # [N*Ka, D]
    b2 = b.x.transpose(0, 1).reshape(Kb * M, D)  # [Kb*M, D], a view for prepared gallery sets
    if isinstance(scale, Tensor) or _needs_grad(a.x, b.x):
        return ((a2 * scale) @ b2.T).view(N, Ka, Kb, M)  # [N, Ka, Kb, M]
    out = (workspace or _Workspace()).get("cosine", (N * Ka, Kb * M), a2)
    # GEMM with alpha = scale (free); beta = 0 ignores the uninitialised `out` (NaN/inf not propagated).
    return torch.addmm(out, a2, b2.T, beta=0, alpha=scale, out=out).view(N, Ka, Kb, M)  # [N, Ka, Kb, M]


def _masked_mean(values: Tensor, mask: Tensor | None, count: Tensor, gallery: bool) -> Tensor:
    """Mean over valid elements of ``values`` [N, K, M] (query side, ``mask [N, K]``) or [N, L, M] (gallery side,
    ``mask [M, L]``) -> [N, M]; ``count`` [N] or [M] is the number of valid elements."""
    if mask is None:
        return values.mean(1)
    keep = mask.T[None] if gallery else mask[:, :, None]  # [1, L, M] or [N, K, 1]
    total = values.masked_fill(~keep, 0.0).sum(1)  # [N, M]
    count = count.clamp_min(1)
    return total / (count[None, :] if gallery else count[:, None])


def _mask_pairs(c: Tensor, a_mask: Tensor | None, b_mask: Tensor | None, value: float) -> Tensor:
    """Fill entries of ``c [N, Ka, Kb, M]`` that involve a masked element with ``value`` (out of place)."""
    if b_mask is not None:
        c = c.masked_fill(~b_mask.T[None, None], value)  # [1, 1, Kb, M]
    if a_mask is not None:
        c = c.masked_fill(~a_mask[:, :, None, None], value)  # [N, Ka, 1, 1]
    return c


def _fill_empty(s: Tensor, a: _Sets, b: _Sets) -> Tensor:
    """``-inf`` where either set of a pair is empty (only needed when masks are given)."""
    if a.mask is None and b.mask is None:
        return s
    return s.masked_fill(a.empty[:, None] | b.empty[None, :], float("-inf"))


def _needs_grad(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------------------- kernels


def _smooth_chamfer_pool(cosine: Tensor, alpha: float | Tensor, a_mask: Tensor | None = None,
                         b_mask: Tensor | None = None) -> Tensor:  # fmt: skip
    """DivE eq. 6-7 on a cosine tile with ``torch.logsumexp`` (stable for any alpha, differentiable).

    Args:
        cosine: [N, Ka, Kb, M] element cosines C.
        alpha: temperature α > 0.
        a_mask: [N, Ka] bool or None. b_mask: [M, Kb] bool or None.

    Returns:
        [N, M] ``1/(2α) [mean_i LSE_j(α C_ij) + mean_j LSE_i(α C_ij)]`` over valid elements (empty sets not filled).
    """
    N, Ka, Kb, M = cosine.shape
    a_count = _count(cosine, a_mask)  # [N]
    b_count = _count(cosine.permute(3, 2, 1, 0), b_mask)  # [M]
    # Multiply before filling: finfo.min * alpha would overflow to -inf.
    z = _mask_pairs(cosine * alpha, a_mask, b_mask, torch.finfo(cosine.dtype).min)  # [N, Ka, Kb, M]
    row = torch.logsumexp(z, dim=2)  # [N, Ka, M]  LSE_j
    col = torch.logsumexp(z, dim=1)  # [N, Kb, M]  LSE_i
    return (_masked_mean(row, a_mask, a_count, False) + _masked_mean(col, b_mask, b_count, True)) / (2 * alpha)


def _smooth_chamfer_kernel(a: _Sets, b: _Sets, *, alpha: float | Tensor, workspace: _Workspace | None = None) -> Tensor:
    limit = _FAST_EXP_MAX_ALPHA.get(a.x.dtype, 0.0)
    if isinstance(alpha, Tensor) or alpha > limit or _needs_grad(a.x, b.x):
        return _fill_empty(_smooth_chamfer_pool(_cosine(a, b), alpha, a.mask, b.mask), a, b)
    # Fast exact path (no autograd, alpha <= 64 in fp32): |αC| <= 64 so exp(αC) is a normal float that cannot
    # overflow, and LSE = log Σ exp(αC) needs no max shift. exp2 of (α·log2 e)·C is ~3x cheaper than exp on CPU.
    ws = workspace or _Workspace()
    e = _cosine(a, b, alpha / _LN2, ws).exp2_()  # [N, Ka, Kb, M] = exp(α C), in place on the GEMM output
    N, Ka, Kb, M = e.shape
    if b.mask is not None:
        e.mul_(b.mask.T[None, None])  # zero masked gallery elements
    if a.mask is not None:
        e.mul_(a.mask[:, :, None, None])  # zero masked query elements
    row = torch.sum(e, 2, out=ws.get("row", (N, Ka, M), e)).log2_()  # [N, Ka, M]  LSE_j / ln 2
    col = torch.sum(e, 1, out=ws.get("col", (N, Kb, M), e)).log2_()  # [N, Kb, M]  LSE_i / ln 2
    s = (_masked_mean(row, a.mask, a.count, False) + _masked_mean(col, b.mask, b.count, True)).mul_(_LN2 / (2 * alpha))
    return _fill_empty(s, a, b)


def _chamfer_kernel(a: _Sets, b: _Sets) -> Tensor:
    c = _mask_pairs(_cosine(a, b), a.mask, b.mask, float("-inf"))  # [N, Ka, Kb, M]
    s = 0.5 * (_masked_mean(c.amax(2), a.mask, a.count, False) + _masked_mean(c.amax(1), b.mask, b.count, True))
    return _fill_empty(s, a, b)


def _max_kernel(a: _Sets, b: _Sets) -> Tensor:
    return _mask_pairs(_cosine(a, b), a.mask, b.mask, float("-inf")).amax(dim=(1, 2))  # [N, M]


def _mean_kernel(a: _Sets, b: _Sets) -> Tensor:
    return _fill_empty(a.x @ b.x.T, a, b)  # [N, M] = <mean_i a_i, mean_j b_j> = mean_ij C_ij


def _match_probability_kernel(
    a: _Sets, b: _Sets, *, scale: float | Tensor, shift: float | Tensor, log: bool = False
) -> Tensor:
    sq = a.sq_norm[:, :, None, None] + b.sq_norm.T[None, None]  # [N, Ka, Kb, M] |a_i|² + |b_j|²
    dist = (sq - 2 * _cosine(a, b)).clamp_min(_SQRT_EPS).sqrt()  # [N, Ka, Kb, M] ‖a_i − b_j‖₂
    if log:  # log mean_ij sigmoid(l_ij) = LSE_ij logsigmoid(l_ij) − log(#pairs): no underflow for far samples
        logp = F.logsigmoid(shift - scale * dist)  # [N, Ka, Kb, M]
        if a.mask is None and b.mask is None:
            return torch.logsumexp(logp, dim=(1, 2)) - math.log(logp.shape[1] * logp.shape[2])
        logp = _mask_pairs(logp, a.mask, b.mask, float("-inf"))
        pairs = (a.count[:, None] * b.count[None, :]).clamp_min(1).to(logp.dtype)  # [N, M]
        return _fill_empty(torch.logsumexp(logp, dim=(1, 2)) - pairs.log(), a, b)
    p = torch.sigmoid(shift - scale * dist)  # [N, Ka, Kb, M]
    if a.mask is None and b.mask is None:
        return p.mean(dim=(1, 2))
    p = _mask_pairs(p, a.mask, b.mask, 0.0)
    return _fill_empty(p.sum(dim=(1, 2)) / (a.count[:, None] * b.count[None, :]).clamp_min(1), a, b)


def _csd_kernel(a: _Sets, b: _Sets, *, use_sigma: bool = True) -> Tensor:
    """``−CSD [N, M]`` from prepared (μ, ‖μ‖² + Σσ²) sets: ``−(s_a + s_b − 2 μ_a·μ_b)``, one GEMM."""
    if use_sigma:
        sq_a, sq_b = a.sq_norm, b.sq_norm  # [N], [M]
    else:
        sq_a, sq_b = a.x.square().sum(-1), b.x.square().sum(-1)  # [N], [M] ‖μ‖² only
    return -(sq_a[:, None] + sq_b[None, :] - 2.0 * a.x @ b.x.T)  # [N, M]


@functools.cache
def _permutations(k: int, device: torch.device) -> Tensor:
    return torch.tensor(list(itertools.permutations(range(k))), dtype=torch.long, device=device)  # [k!, k]


def _pair_assignment_kernel(a: _Sets, b: _Sets, *, tau: float, iterations: int, exact: bool | None) -> Tensor:
    c = _cosine(a, b).permute(0, 3, 1, 2)  # [N, M, Ka, Kb]
    N, M, Ka, Kb = c.shape
    k = max(Ka, Kb)
    # Square padding: entries touching a padded/masked element get `dummy`; |dummy| > 2k - 1 makes every optimum
    # use the most valid-valid pairs, min(#valid a, #valid b), so pairs of real elements are never traded for it.
    dummy = -(2.0 * k + 1.0)
    valid = torch.ones(N, M, Ka, Kb, dtype=torch.bool, device=c.device)  # [N, M, Ka, Kb]
    if a.mask is not None:
        valid = valid & a.mask[:, None, :, None]
    if b.mask is not None:
        valid = valid & b.mask[None, :, None, :]
    padded = F.pad(c.masked_fill(~valid, dummy), (0, k - Kb, 0, k - Ka), value=dummy)  # [N, M, k, k]
    gain = F.pad(c.masked_fill(~valid, 0.0), (0, k - Kb, 0, k - Ka), value=0.0)  # [N, M, k, k] C on real pairs
    pairs = torch.minimum(a.count[:, None], b.count[None, :])  # [N, M]
    if exact is None:
        exact = not _needs_grad(a.x, b.x, tau)
    if not exact:
        plan = sinkhorn(padded / tau, iterations)  # [N, M, k, k]
        total = (plan * gain).sum(dim=(2, 3))  # [N, M]
    else:
        if k <= _EXACT_BRUTE_FORCE_MAX_K:
            perms = _permutations(k, c.device)  # [P, k]
            onehot = F.one_hot(perms, k).to(c.dtype).reshape(len(perms), k * k)  # [P, k*k]
            best = perms[(padded.reshape(N * M, k * k) @ onehot.T).argmax(1)]  # [N*M, k], first maximum wins
        else:
            flat = padded.detach().reshape(N * M, k, k).cpu().numpy()
            best = torch.as_tensor(np.stack([linear_sum_assignment(m, maximize=True)[1] for m in flat]))
            best = best.to(c.device)  # [N*M, k]
        total = gain.reshape(N * M, k, k).gather(2, best[:, :, None]).sum(dim=(1, 2)).view(N, M)
    s = total / pairs.clamp_min(1)
    return s.masked_fill(pairs == 0, float("-inf"))


class _Kernel(NamedTuple):
    prepare: Callable[[Tensor, Tensor | None, torch.dtype, bool], _Sets]
    pair: Callable[..., Tensor]  # (a: _Sets, b: _Sets, **kw) -> [N, M]
    cost_per_pair: Callable[[int, int, dict[str, Any]], int]  # tile elements per pair of sets (block sizing)
    workspace: bool = False  # pair() takes `workspace=` (buffers reused across the tiles of score)


def _assignment_cost(Ka: int, Kb: int, kw: dict[str, Any]) -> int:
    k = max(Ka, Kb)
    if kw.get("exact") is False or k > _EXACT_BRUTE_FORCE_MAX_K:
        return 4 * k * k
    return 4 * k * k + math.factorial(k)


_KERNELS: dict[str, _Kernel] = {
    "smooth_chamfer": _Kernel(_prepare_cosine, _smooth_chamfer_kernel, lambda ka, kb, kw: ka * kb, workspace=True),
    "chamfer": _Kernel(_prepare_cosine, _chamfer_kernel, lambda ka, kb, kw: ka * kb),
    "max_similarity": _Kernel(_prepare_cosine, _max_kernel, lambda ka, kb, kw: ka * kb),
    "mean_similarity": _Kernel(_prepare_mean, _mean_kernel, lambda ka, kb, kw: 1),
    "match_probability": _Kernel(_prepare_raw, _match_probability_kernel, lambda ka, kb, kw: 3 * ka * kb),
    "pair_assignment": _Kernel(_prepare_cosine, _pair_assignment_kernel, _assignment_cost),
    "csd": _Kernel(_prepare_gaussian, _csd_kernel, lambda ka, kb, kw: 1),
}

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


def sinkhorn(log_kernel: Tensor, iterations: int = 20) -> Tensor:
    """Log-domain Sinkhorn (M§3.3): ``iterations`` times ``Z ← Z − LSE_row(Z)``, ``Z ← Z − LSE_col(Z)``; ``P = exp Z``.

    Args:
        log_kernel: [..., K, K] log-potentials Z (MaxMatch: C/τ).
        iterations: number of row + column normalisations.

    Returns:
        [..., K, K] transport plan P; columns sum to 1 exactly, rows approximately (doubly stochastic at convergence).
    """
    z = log_kernel
    for _ in range(iterations):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)  # rows
        z = z - torch.logsumexp(z, dim=-2, keepdim=True)  # columns
    return z.exp()


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


# ----------------------------------------------------------------------------------------------- tiled scoring


def _block_sizes(block_size: int | tuple[int, int] | None, cost: int) -> tuple[int, int]:
    if block_size is None:
        side = max(1, math.isqrt(max(1, _TILE_ELEMENTS // max(1, cost))))
        return side, side
    sizes = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"block_size must be a positive int or (query, gallery) pair, got {block_size}")
    return int(sizes[0]), int(sizes[1])


def _rows(x: Any, start: int, stop: int, device: torch.device) -> Tensor | None:
    """Rows ``start:stop`` of a tensor or an array-like (numpy, zarr) as a tensor on ``device``."""
    if x is None:
        return None
    block = x[start:stop]
    return (block if isinstance(block, Tensor) else torch.as_tensor(np.asarray(block))).to(device)


def _merge_topk(values: Tensor, indices: Tensor, tile: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """Running top-k over columns seen so far; ties keep the lower gallery index (stable sort, lower indices first)."""
    Bt, Gt = tile.shape
    new = torch.arange(start, start + Gt, device=tile.device).expand(Bt, Gt)  # [Bt, Gt]
    values, order = torch.sort(torch.cat([values, tile], 1), dim=1, descending=True, stable=True)
    indices = torch.cat([indices, new], 1).gather(1, order[:, :k])
    return values[:, :k], indices


def score(queries: Tensor, database: Any, similarity: str | Callable[..., Tensor] = "smooth_chamfer", *,
          query_mask: Tensor | None = None, database_mask: Any = None, block_size: int | tuple[int, int] | None = None,
          topk: int | None = None, **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """Score every query set against every gallery set in tiles (M§6: COCO 5K is 20,000 × 100,000 elements).

    Tiles over both queries and gallery, so peak memory is one ``[Bq·K, Bg·L]`` tile plus the output and never
    grows with ``B·G·K·L``. Queries are normalised once; each gallery block is loaded, converted with
    ``torch.as_tensor`` and normalised once, then scored against every query block. Autograd is kept only when an
    input (or a tensor kwarg) requires grad; otherwise the work runs under ``torch.no_grad()``.

    Args:
        queries: [B, K, D] float tensor.
        database: [G, L, D] float tensor, or an array-like with ``.shape`` whose row slices give numpy (zarr).
        similarity: a registered name (``list_similarities()``), a ``create_similarity`` callable, or any callable
            ``(a, b, a_mask=None, b_mask=None, **kwargs) -> [N, M]``.
        query_mask: [B, K] bool or None. database_mask: [G, L] bool (tensor or array-like) or None.
        block_size: (query, gallery) sets per tile, or one int for both; None picks ~64 MB tiles.
        topk: if set, return only the k best gallery items per query, merged block by block without materialising
            [B, G]. Ties: the lower gallery index ranks first.
        **kwargs: hyper-parameters of the similarity (``alpha=16.0``, ...).

    Returns:
        [B, G] float32 (float64 for float64 queries) scores, or with ``topk=k`` a pair ``(scores [B, k],
        indices [B, k] int64)`` sorted best first.
    """
    _check_sets("queries", queries, query_mask)
    _check_sets("database", database, database_mask, width=queries.shape[2])
    B, K, D = queries.shape
    G, L, _ = database.shape
    if topk is not None and not 1 <= topk <= G:
        raise ValueError(f"topk must be in [1, G={G}] (database {tuple(database.shape)}), got {topk}")
    name = similarity if isinstance(similarity, str) else None
    if isinstance(similarity, functools.partial) and similarity.func in _NAME_OF and not similarity.args:
        name, kwargs = _NAME_OF[similarity.func], {**similarity.keywords, **kwargs}
    if name is not None:
        SIMILARITIES.get(name)  # unknown name -> ValueError listing the known ones
        kwargs = _resolve_kwargs(name, kwargs)
    kernel = _KERNELS[name] if name is not None and K > 0 and L > 0 else None
    bq, bg = _block_sizes(block_size, kernel.cost_per_pair(K, L, kwargs) if kernel else K * L)
    device = queries.device
    dtype = _compute_dtype(queries.dtype, *([database.dtype] if isinstance(database, Tensor) else []))
    grad = _needs_grad(queries, database, *kwargs.values())
    query_mask = None if query_mask is None else query_mask.to(device)
    starts = range(0, B, bq)
    with contextlib.nullcontext() if grad else torch.no_grad():
        if kernel is not None:
            prepared = kernel.prepare(queries, query_mask, dtype, False)  # normalised once
            tile_kwargs = {**kwargs, "workspace": _Workspace()} if kernel.workspace else kwargs
            tile_fn = functools.partial(_prepared_tile, kernel, prepared, tile_kwargs)
        else:
            func = similarity if name is None else functools.partial(_apply, name)
            tile_fn = functools.partial(_raw_tile, func, queries, query_mask, kwargs)
        out = torch.empty(B, G, dtype=dtype, device=device) if not grad and topk is None else None
        columns: list[Tensor] = []  # grad path: [B, Gt] per gallery block
        best = [_empty_topk(min(b0 + bq, B) - b0, dtype, device) for b0 in starts]  # running top-k per query block
        for g0 in range(0, G, bg):
            g1 = min(g0 + bg, G)
            block, block_mask = _rows(database, g0, g1, device), _rows(database_mask, g0, g1, device)
            gallery = kernel.prepare(block, block_mask, dtype, True) if kernel else (block, block_mask)  # once/block
            tiles = []
            for i, b0 in enumerate(starts):
                b1 = min(b0 + bq, B)
                tile = tile_fn(b0, b1, gallery).to(dtype)  # [Bt, Gt]
                if topk is not None:
                    best[i] = _merge_topk(*best[i], tile, g0, topk)
                elif out is not None:
                    out[b0:b1, g0:g1] = tile
                else:
                    tiles.append(tile)
            if tiles:
                columns.append(torch.cat(tiles, 0))  # [B, Gt]
    if topk is not None:
        return torch.cat([v for v, _ in best], 0), torch.cat([i for _, i in best], 0)
    if out is not None:
        return out
    return torch.cat(columns, 1) if columns else torch.empty(B, G, dtype=dtype, device=device)


def _prepared_tile(kernel: _Kernel, queries: _Sets, kwargs: dict[str, Any], b0: int, b1: int, gallery: _Sets) -> Tensor:
    return kernel.pair(queries.rows(b0, b1), gallery, **kwargs)  # [Bt, Gt]


def _raw_tile(func: Callable[..., Tensor], queries: Tensor, query_mask: Tensor | None, kwargs: dict[str, Any],
              b0: int, b1: int, gallery: tuple[Tensor, Tensor | None]) -> Tensor:  # fmt: skip
    q_mask = None if query_mask is None else query_mask[b0:b1]
    return func(queries[b0:b1], gallery[0], a_mask=q_mask, b_mask=gallery[1], **kwargs)  # [Bt, Gt]


def _empty_topk(rows: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.empty(rows, 0, dtype=dtype, device=device), torch.empty(rows, 0, dtype=torch.long, device=device)
