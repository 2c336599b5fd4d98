"""Similarity kernels: sets prepared once (normalised, cast, maybe reduced), one GEMM per tile, reductions by name.

Each similarity of ``setemb.similarity`` is a ``_Kernel``: ``prepare`` turns a batch of sets into ``_Sets`` (query
side ``[N, K, D]``, gallery side stored element-major ``[K, N, D]``), and ``pair`` scores two prepared batches to
``[N, M]``. ``functions`` (one call per pair of batches) and ``scoring`` (tiles) share them, so a gallery block is
prepared once for every query block. Shapes and conventions: see the package docstring.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

_LN2 = math.log(2.0)
# Largest alpha for which exp(alpha * C), C in [-1, 1], stays a normal float with room for sums (fast path).
_FAST_EXP_MAX_ALPHA = {torch.float32: 64.0, torch.float64: 600.0}
_EXACT_BRUTE_FORCE_MAX_K = 6  # 6! = 720 permutations; above that the exact path loops over scipy per pair.
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
