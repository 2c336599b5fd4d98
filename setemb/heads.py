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
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from setemb.registry import Registry

logger = logging.getLogger(__name__)

HEADS: Registry[nn.Module] = Registry("head")


@dataclass
class SetOutput:
    """What every head returns (docs/DESIGN.md)."""

    embeddings: Tensor  # [B, K, D] rows L2-normalised (PCME: J samples, not re-normalised)
    attention: Tensor | None = None  # [B, K, N] weights of each element over the inputs
    elements: Tensor | None = None  # [B, K, D] row-normalised elements before adding the global feature
    global_embedding: Tensor | None = None  # [B, D] L2-normalised global branch
    mean: Tensor | None = None  # [B, D] PCME mu
    logsigma: Tensor | None = None  # [B, D] PCME log std


def list_heads() -> list[str]:
    """Registered head names, sorted."""
    return HEADS.list()


def create_head(name: str, **kwargs: Any) -> nn.Module:
    """Build the head registered as ``name``; ``None`` kwargs fall back to the constructor defaults."""
    return HEADS.create(name, **kwargs)


def _check_inputs(local: Tensor, global_: Tensor, mask: Tensor | None, input_dim: int, embed_dim: int) -> None:
    """ValueError with expected and actual shapes unless local [B, N, D_in], global_ [B, D], mask [B, N] bool."""
    if local.ndim != 3 or local.shape[-1] != input_dim:
        raise ValueError(f"local must be [B, N, {input_dim}], got {tuple(local.shape)}")
    B, N, _ = local.shape
    if global_ is None or tuple(global_.shape) != (B, embed_dim):
        got = None if global_ is None else tuple(global_.shape)
        raise ValueError(f"global_ must be [{B}, {embed_dim}], got {got}")
    if mask is not None and (tuple(mask.shape) != (B, N) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool [{B}, {N}], got {mask.dtype} {tuple(mask.shape)}")


# ----------------------------------------------------------------------------------------------- positional codes


def sine_encoding(positions: Tensor, dim: int) -> Tensor:
    """Interleaved sinusoidal code (M§1.3): channel pair i gets sin/cos(p / 10000^(2⌊i/2⌋/dim)).

    Args:
        positions: [...] float positions (already scaled to (0, 2π]).
        dim: even number of channels.

    Returns:
        [..., dim] in the dtype and device of ``positions``.
    """
    exponent = torch.arange(0, dim, 2, device=positions.device, dtype=positions.dtype) / dim  # [dim/2]
    angles = positions[..., None] / (10000.0**exponent)  # [..., dim/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # [..., dim]


def sine_encoding_1d(mask: Tensor, dim: int, *, official: bool = False) -> Tensor:
    """1-D word code (M§1.3): p = 2π·rank/L, added to the normalised word features before W_k.

    By default ``rank`` counts valid tokens only (1-based) and ``L`` is the number of valid tokens of each sample, so a
    caption's code does not depend on how much the batch was padded (nor on dropped tokens). ``official=True``
    reproduces the official code: rank = position index + 1 and L = padded length N of the batch.

    Args:
        mask: [B, N] bool, True = valid.
        dim: channels D_in (even).
        official: use the batch-padded-length scaling of the official code.

    Returns:
        [B, N, dim] float32 code (cast by the caller); values at padded positions are meaningless.
    """
    B, N = mask.shape
    if official:
        rank = torch.arange(1, N + 1, device=mask.device, dtype=torch.float32).expand(B, N)  # [B, N]
        length = torch.full((B, 1), float(N), device=mask.device)  # [B, 1]
    else:
        rank = mask.cumsum(dim=1).float()  # [B, N]
        length = mask.sum(dim=1, keepdim=True).clamp(min=1).float()  # [B, 1]
    return sine_encoding(2 * math.pi * rank / length, dim)  # [B, N, dim]


def sine_encoding_2d(height: int, width: int, dim: int, *, device: torch.device | None = None) -> Tensor:
    """2-D grid code (M§1.3): dim/2 channels for the row index, dim/2 for the column index, concatenated (row first).

    Returns:
        [height * width, dim] float32, cells in row-major order.
    """
    rows = 2 * math.pi * torch.arange(1, height + 1, device=device, dtype=torch.float32) / height  # [Hg]
    cols = 2 * math.pi * torch.arange(1, width + 1, device=device, dtype=torch.float32) / width  # [Wg]
    row_code = sine_encoding(rows, dim // 2)[:, None, :].expand(height, width, dim // 2)  # [Hg, Wg, dim/2]
    col_code = sine_encoding(cols, dim // 2)[None, :, :].expand(height, width, dim // 2)  # [Hg, Wg, dim/2]
    return torch.cat((row_code, col_code), dim=-1).reshape(height * width, dim)  # [N, dim]


# --------------------------------------------------------------------------------------------- attention weights


def slot_competition(logits: Tensor, mask: Tensor | None, *, official_mask_leak: bool = False) -> Tensor:
    """DivE eq. 2: A[n, :] = softmax_k(M[n, :]), each input distributes one unit of attention over the slots.

    Padded keys are zeroed *after* the softmax (the fix of M§1.2), so they take no part in eq. 3. With
    ``official_mask_leak`` the official code is reproduced: padded keys get logit -max before the softmax, which gives
    them 1/K in every slot, so their (arbitrary) values leak into every slot.

    Args:
        logits: [B, H, N, K] logits M.
        mask: [B, N] bool, True = valid, or None.
        official_mask_leak: reproduce the official masking bug.

    Returns:
        [B, H, N, K] A; rows of valid inputs sum to 1 over K, rows of padded inputs are 0 (or 1/K with the leak).
    """
    if mask is None:
        return logits.softmax(dim=-1)
    keep = mask[:, None, :, None]  # [B, 1, N, 1]
    if official_mask_leak:
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min).softmax(dim=-1)
    return logits.softmax(dim=-1) * keep


def normalise_over_inputs(attention: Tensor, eps: float = 1e-7) -> Tensor:
    """DivE eq. 3: Â[n, k] = A[n, k] / (Σ_n' A[n', k] + eps), turning each slot's column into a weighted mean.

    Args:
        attention: [B, H, N, K] A from `slot_competition`.
        eps: 1e-7 in the official code.

    Returns:
        [B, H, N, K] Â; each column sums to 1 over the inputs (up to eps).
    """
    return attention / (attention.sum(dim=2, keepdim=True) + eps)


def softmax_over_inputs(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Standard cross-attention (DivE Table 3 "transformer block"): softmax over the N inputs, padded keys excluded.

    Args:
        logits: [B, H, N, K]; mask: [B, N] bool or None.

    Returns:
        [B, H, N, K], columns sum to 1 over valid inputs.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :, None], torch.finfo(logits.dtype).min)
    return logits.softmax(dim=2)


class _AggregationBlock(nn.Module):
    """One aggregation block of the SPM (DivE eq. 1-4), applied T times with shared weights."""

    def __init__(
        self,
        embed_dim: int,
        input_dim: int,
        attention_dim: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        attention_normalisation: Literal["slots", "inputs"],
        official_mask_leak: bool,
        eps: float,
        dd: dict[str, Any],
    ) -> None:
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim ({attention_dim}) must be divisible by num_heads ({num_heads})")
        if attention_normalisation not in ("slots", "inputs"):
            raise ValueError(f"attention_normalisation must be 'slots' or 'inputs', got {attention_normalisation!r}")
        self.num_heads = num_heads
        self.scale = (attention_dim // num_heads) ** -0.5  # per-head width, not attention_dim (cf. [LR])
        self.attention_normalisation = attention_normalisation
        self.official_mask_leak = official_mask_leak
        self.eps = eps
        self.norm_inputs = nn.LayerNorm(input_dim, **dd)  # LN_x
        self.norm_slots = nn.LayerNorm(embed_dim, **dd)  # LN_e
        self.to_q = nn.Linear(embed_dim, attention_dim, bias=False, **dd)
        self.to_k = nn.Linear(input_dim, attention_dim, bias=False, **dd)
        self.to_v = nn.Linear(input_dim, attention_dim, bias=False, **dd)
        self.to_out = nn.Linear(attention_dim, embed_dim, **dd)  # W_o
        self.out_drop = nn.Dropout(dropout)
        hidden = int(round(mlp_ratio * embed_dim))
        self.norm_mlp = nn.LayerNorm(embed_dim, **dd)  # LN_f
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden, **dd), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, embed_dim, **dd)
        )

    def project_inputs(self, local: Tensor, code: Tensor | None) -> tuple[Tensor, Tensor]:
        """DivE eq. 1 (input side): Kx = (LN_x(X) + P) W_k, V = LN_x(X) W_v, computed once for all T iterations.

        Args:
            local: [B, N, D_in]; code: positional code broadcastable to [B, N, D_in] or None.

        Returns:
            keys, values: [B, H, N, D_h/H].
        """
        x = self.norm_inputs(local)  # [B, N, D_in]
        keys = self.to_k(x if code is None else x + code)  # [B, N, D_h]
        values = self.to_v(x)  # [B, N, D_h]
        split = "b n (h d) -> b h n d"
        return rearrange(keys, split, h=self.num_heads), rearrange(values, split, h=self.num_heads)  # [B, H, N, d]

    def forward(self, slots: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """One iteration, DivE eq. 1-4.

        Args:
            slots: [B, K, D] E^{t-1}; keys, values: [B, H, N, D_h/H]; mask: [B, N] bool or None.

        Returns:
            slots: [B, K, D] E^t; attention: [B, H, N, K] Â.
        """
        queries = rearrange(self.to_q(self.norm_slots(slots)), "b k (h d) -> b h k d", h=self.num_heads)
        logits = torch.einsum("bhnd,bhkd->bhnk", keys, queries) * self.scale  # [B, H, N, K] eq. 1
        if self.attention_normalisation == "slots":
            attention = slot_competition(logits, mask, official_mask_leak=self.official_mask_leak)  # eq. 2
            attention = normalise_over_inputs(attention, self.eps)  # eq. 3
        else:
            attention = softmax_over_inputs(logits, mask)
        updates = torch.einsum("bhnk,bhnd->bhkd", attention, values)  # [B, H, K, d]
        updates = rearrange(updates, "b h k d -> b k (h d)")  # [B, K, D_h]
        slots = slots + self.out_drop(self.to_out(updates))  # Ē = Â^T V W_o + E
        slots = slots + self.mlp(self.norm_mlp(slots))  # eq. 4
        return slots, attention


# ------------------------------------------------------------------------------------------------------- DivE SPM


@HEADS.register("slot")
class SetPredictionModule(nn.Module):
    """DivE set prediction module (DivE eq. 1-5, M§1): K learnable slots refined by T shared aggregation blocks.

    Args:
        embed_dim: D (1024).
        num_embeddings: K (4).
        input_dim: D_in of the local features (default D; 300 for GloVe words).
        num_iterations: T (4); the block's weights are shared across iterations.
        attention_dim: D_h (1024 conv / 2048 ROI), split over ``num_heads``; logits scaled by 1/sqrt(D_h/H).
        num_heads: H (1 = paper, 4 with D_h = 2048 = official code).
        mlp_ratio: r of the eq. 4 MLP (4).
        dropout: after W_o and after the GELU (0.1).
        positional_encoding: "none" (ROI), "sine2d" (conv grids; needs ``grid_size`` or a square N) or "sine1d"
            (words), added to the key input only (M§1.3).
        grid_size: grid side (int) or (rows, cols) for "sine2d"; None infers a square grid from N.
        official_text_pe: "sine1d" scaled by the padded batch length, as the official code (batch-dependent).
        official_mask_leak: reproduce the official padding bug (M§1.2); off by default.
        attention_normalisation: "slots" (eq. 2-3, DivE) or "inputs" (standard cross-attention).
        eps: of eq. 3.
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        num_embeddings: int = 4,
        input_dim: int | None = None,
        num_iterations: int = 4,
        attention_dim: int = 1024,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        positional_encoding: Literal["none", "sine1d", "sine2d"] = "none",
        grid_size: int | tuple[int, int] | list[int] | None = None,
        official_text_pe: bool = False,
        official_mask_leak: bool = False,
        attention_normalisation: Literal["slots", "inputs"] = "slots",
        eps: float = 1e-7,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        input_dim = embed_dim if input_dim is None else input_dim
        if positional_encoding not in ("none", "sine1d", "sine2d"):
            raise ValueError(f"positional_encoding must be 'none', 'sine1d' or 'sine2d', got {positional_encoding!r}")
        if positional_encoding == "sine1d" and input_dim % 2:
            raise ValueError(f"sine1d needs an even input_dim, got {input_dim}")
        if positional_encoding == "sine2d" and input_dim % 4:
            raise ValueError(f"sine2d needs input_dim divisible by 4, got {input_dim}")
        if num_iterations < 1 or num_embeddings < 1:
            raise ValueError(f"num_iterations and num_embeddings must be >= 1, got {num_iterations}, {num_embeddings}")
        self.embed_dim, self.num_embeddings, self.input_dim = embed_dim, num_embeddings, input_dim
        self.num_iterations = num_iterations
        self.positional_encoding = positional_encoding
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.official_text_pe = official_text_pe
        self.slots = nn.Parameter(torch.randn(num_embeddings, embed_dim, **dd))  # E^0 ~ N(0, 1)
        self.block = _AggregationBlock(
            embed_dim,
            input_dim,
            attention_dim,
            num_heads,
            mlp_ratio,
            dropout,
            attention_normalisation,
            official_mask_leak,
            eps,
            dd,
        )
        self.norm_out = nn.LayerNorm(embed_dim, **dd)  # LN_out
        self.norm_global = nn.LayerNorm(embed_dim, **dd)  # LN_g

    def _code(self, local: Tensor, mask: Tensor | None) -> Tensor | None:
        """Positional code added to the key input, [B or 1, N, D_in], or None."""
        B, N, D_in = local.shape
        if self.positional_encoding == "none":
            return None
        if self.positional_encoding == "sine1d":
            mask = torch.ones(B, N, dtype=torch.bool, device=local.device) if mask is None else mask
            return sine_encoding_1d(mask, D_in, official=self.official_text_pe).to(local.dtype)  # [B, N, D_in]
        rows, cols = self.grid_size if self.grid_size is not None else (math.isqrt(N), math.isqrt(N))
        if rows * cols != N:
            raise ValueError(f"sine2d needs N = rows * cols; grid_size={self.grid_size}, got N={N}")
        return sine_encoding_2d(rows, cols, D_in, device=local.device).to(local.dtype)[None]  # [1, N, D_in]

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor | None = None) -> SetOutput:
        """DivE eq. 1-5.

        Args:
            local: [B, N, D_in] local features X.
            global_: [B, D] global feature g.
            mask: [B, N] bool, True = valid, or None (all valid).

        Returns:
            `SetOutput` with embeddings S [B, K, D] = rownorm(LN_out(E^T) + LN_g(g)) (eq. 5), elements
            rownorm(LN_out(E^T)), attention [B, K, N] (last iteration, averaged over heads), global_embedding.
        """
        _check_inputs(local, global_, mask, self.input_dim, self.embed_dim)
        B, N, _ = local.shape
        keys, values = self.block.project_inputs(local, self._code(local, mask))  # [B, H, N, d]
        slots = self.slots.expand(B, -1, -1)  # [B, K, D]
        for _ in range(self.num_iterations):
            slots, attention = self.block(slots, keys, values, mask)
        elements = self.norm_out(slots)  # [B, K, D]
        glob = self.norm_global(global_)  # [B, D]
        return SetOutput(
            embeddings=F.normalize(elements + glob[:, None, :], dim=-1),  # eq. 5
            attention=attention.mean(dim=1).transpose(1, 2),  # [B, K, N]
            elements=F.normalize(elements, dim=-1),
            global_embedding=F.normalize(glob, dim=-1),
        )


@HEADS.register("transformer")
class TransformerAttentionHead(SetPredictionModule):
    """The SPM with a standard cross-attention block (softmax over inputs), DivE Table 3/4 ablation.

    Same arguments as `SetPredictionModule` (``official_mask_leak`` has no effect: padded keys are always excluded).
    """

    def __init__(self, embed_dim: int = 1024, num_embeddings: int = 4, **kwargs: Any) -> None:
        kwargs.pop("attention_normalisation", None)
        super().__init__(embed_dim, num_embeddings, attention_normalisation="inputs", **kwargs)


# --------------------------------------------------------------------------------------------------- PVSE / PCME


class _AttentionPool(nn.Module):
    """PVSE eq. 2: α = softmax_n(W_2 tanh(W_1 X^T)), K attention maps over the inputs (no biases)."""

    def __init__(self, input_dim: int, num_maps: int, dd: dict[str, Any]) -> None:
        super().__init__()
        self.w1 = nn.Linear(input_dim, max(input_dim // 2, 1), bias=False, **dd)
        self.w2 = nn.Linear(max(input_dim // 2, 1), num_maps, bias=False, **dd)

    def forward(self, local: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Args: local [B, N, D_in]; mask [B, N] bool or None.

        Returns:
            alpha [B, K, N] (rows sum to 1 over valid inputs), pooled α X [B, K, D_in].
        """
        logits = self.w2(torch.tanh(self.w1(local))).transpose(1, 2)  # [B, K, N]
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, :], torch.finfo(logits.dtype).min)
        alpha = logits.softmax(dim=-1)  # [B, K, N]
        return alpha, torch.einsum("bkn,bnd->bkd", alpha, local)  # [B, K, D_in]


@HEADS.register("pienet")
class PIENet(nn.Module):
    """PVSE polysemous instance embedding network (PVSE eq. 2-4, M§4.3).

    Args:
        embed_dim: D. num_embeddings: K. input_dim: D_in of the local features (default D).
        dropout: on Υ (PVSE default 0).
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        num_embeddings: int = 2,
        input_dim: int | None = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_embeddings = embed_dim, num_embeddings
        self.input_dim = embed_dim if input_dim is None else input_dim
        self.attention = _AttentionPool(self.input_dim, num_embeddings, dd)
        self.fc = nn.Linear(self.input_dim, embed_dim, **dd)  # W_3, b_3
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor | None = None) -> SetOutput:
        """PVSE eq. 2-4: Υ = Drop(sigmoid(α X W_3 + b_3)) (eq. 3), Z = rownorm(LN(1_K ⊗ g + Υ)) (eq. 4).

        Args:
            local: [B, N, D_in]; global_: [B, D]; mask: [B, N] bool or None.

        Returns:
            `SetOutput` with embeddings Z [B, K, D], elements rownorm(Υ), attention α [B, K, N].
        """
        _check_inputs(local, global_, mask, self.input_dim, self.embed_dim)
        alpha, pooled = self.attention(local, mask)  # [B, K, N], [B, K, D_in]
        residual = self.dropout(torch.sigmoid(self.fc(pooled)))  # [B, K, D] Υ
        fused = self.norm(global_[:, None, :] + residual)  # [B, K, D]
        return SetOutput(
            embeddings=F.normalize(fused, dim=-1),
            attention=alpha,
            elements=F.normalize(residual, dim=-1),
            global_embedding=F.normalize(global_, dim=-1),
        )


@HEADS.register("probabilistic")
class ProbabilisticHead(nn.Module):
    """PCME / PCME++ probabilistic embedding head (M§4.4, M§4.4b): a K = 1 PIE-Net mean and a log-sigma branch.

    ``μ = rownorm(LN(g + sigmoid(fc(attn-pool(X)))))`` reads the trainable encoder's features (X, g). The
    log-sigma branch ``logσ = fc_σ(attn-pool_σ(X_bb)) + fc₂(mean(X_bb))`` has its own attention pool and layers and,
    with ``sigma_input="backbone"`` (default), reads the *frozen backbone* features X_bb that `Tower` passes as
    ``backbone=`` (the encoder's input; bi-GRU: its word embeddings), as PCME's uncertainty modules read the CNN
    grid / word embeddings rather than the projected features of the mean. ``sigma_input="shared"`` reproduces the
    earlier design, where the branch read the encoder's projections (X, g) that μ also reads: the large uniform
    "shrink σ" gradient at the start of training then moves every item's projected features the same way and μ
    collapses onto one point per modality (issue #10, evidence in docs/DESIGN.md). It is kept for that ablation.

    ``logsigma`` is the log *standard deviation* everywhere (PCME sampling, the KL terms, PCME++'s CSD).

    Args:
        embed_dim: D. num_embeddings: must be 1 (one Gaussian per item).
        input_dim: D_in of the encoder features X (default D).
        backbone_dim: width of the backbone features X_bb read by the σ branch (default ``input_dim``); `create_model`
            sets it from the encoder.
        num_samples: J (7). dropout: of the mean branch's PIE-Net.
        sample_in_eval: with ``output="samples"``, also sample in eval mode (default True: PCME evaluates match
            probability on J samples); False returns embeddings = μ[:, None] in eval mode.
        output: ``"samples"`` (PCME: embeddings are J samples μ + σ ⊙ ε, not re-normalised) or ``"mean_std"``
            (PCME++: embeddings ``[B, 2, D]`` = (μ, σ), in training and evaluation, what ``csd_similarity`` reads).
        sigma_input: ``"backbone"`` (default) or ``"shared"`` (the collapsing ablation, see above).
        sigma_bias_init: initial bias of ``fc₂``; None (default) = ``−½ log(2D)``, so the initial sampling noise
            ``‖σ(ε − ε')‖ ≈ σ√(2D) ≈ 1`` is on the scale of the distances between unit-norm means. With 0 (σ ≈ 1) every
            sample distance starts near √(2D) (≈ 23 at D = 256), far beyond PCME's b/a ≈ 1, so every pair's match
            probability is ≈ 0: the loss then only pulls positives together and shrinks σ — the same direction for
            every item — for as long as σ takes to shrink, and μ collapses (issue #10, docs/DESIGN.md).
        eval_seed: seeds the evaluation samples when no ``generator`` is passed: in eval mode every item of this
            head gets the same J noise vectors ε_j ~ N(0, I) drawn from ``torch.Generator().manual_seed(eval_seed)``
            (common random numbers), so PCME's metrics are reproducible and do not depend on batch size or order.
            Give the image and text heads different seeds (the pcme profile uses 0 and 1). A negative seed draws
            unseeded samples from the global RNG (the earlier, irreproducible behaviour).
    """

    reads_backbone = True  # `Tower` passes the encoder's input as ``backbone=``

    def __init__(
        self,
        embed_dim: int = 1024,
        num_embeddings: int = 1,
        input_dim: int | None = None,
        backbone_dim: int | None = None,
        num_samples: int = 7,
        dropout: float = 0.0,
        sample_in_eval: bool = True,
        output: Literal["samples", "mean_std"] = "samples",
        sigma_input: Literal["backbone", "shared"] = "backbone",
        sigma_bias_init: float | None = None,
        eval_seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings != 1:
            raise ValueError(f"probabilistic head has one mean per sample (num_embeddings=1), got {num_embeddings}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if output not in ("samples", "mean_std"):
            raise ValueError(f"output must be 'samples' or 'mean_std', got {output!r}")
        if sigma_input not in ("backbone", "shared"):
            raise ValueError(f"sigma_input must be 'backbone' or 'shared', got {sigma_input!r}")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_embeddings, self.num_samples = embed_dim, 1, num_samples
        self.input_dim = embed_dim if input_dim is None else input_dim
        self.sigma_input, self.output, self.sample_in_eval = sigma_input, output, sample_in_eval
        self.eval_seed = eval_seed
        self.backbone_dim = self.input_dim if backbone_dim is None or sigma_input == "shared" else backbone_dim
        self.mean_net = PIENet(embed_dim, 1, self.input_dim, dropout, **dd)
        self.sigma_attention = _AttentionPool(self.backbone_dim, 1, dd)
        self.sigma_local = nn.Linear(self.backbone_dim, embed_dim, **dd)  # fc_σ
        # fc₂: of the mean-pooled backbone features, or ("shared") of the encoder's global feature g
        self.sigma_global = nn.Linear(embed_dim if sigma_input == "shared" else self.backbone_dim, embed_dim, **dd)
        if sigma_bias_init is None:
            sigma_bias_init = -0.5 * math.log(2 * embed_dim)
        nn.init.constant_(self.sigma_global.bias, sigma_bias_init)

    def log_sigma(self, local: Tensor, global_: Tensor, mask: Tensor | None, backbone: Tensor | None) -> Tensor:
        """``logσ [B, D]`` of the σ branch (see the class docstring for its inputs)."""
        if self.sigma_input == "shared":
            _, pooled = self.sigma_attention(local, mask)  # [B, 1, D_in]
            return self.sigma_local(pooled[:, 0]) + self.sigma_global(global_)  # [B, D]
        x = local if backbone is None else backbone  # [B, N, D_bb]
        if x.ndim != 3 or x.shape[:2] != local.shape[:2] or x.shape[-1] != self.backbone_dim:
            raise ValueError(
                f"backbone must be [{local.shape[0]}, {local.shape[1]}, {self.backbone_dim}], got {tuple(x.shape)}"
            )
        x = x.to(local.dtype)
        _, pooled = self.sigma_attention(x, mask)  # [B, 1, D_bb]
        if mask is None:
            mean = x.mean(dim=1)  # [B, D_bb]
        else:
            weights = mask.to(x.dtype)[..., None]  # [B, N, 1]
            mean = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)  # [B, D_bb]
        return self.sigma_local(pooled[:, 0]) + self.sigma_global(mean)  # [B, D]

    def _noise(self, B: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        """ε [B, J, D]: from ``generator``; in eval mode without one, the head's fixed ``eval_seed`` draws."""
        J, D = self.num_samples, self.embed_dim
        if generator is None and not self.training and self.eval_seed >= 0:
            fixed = torch.Generator().manual_seed(self.eval_seed)  # CPU draw: the same values on every device
            return torch.randn(J, D, generator=fixed).to(like)[None].expand(B, J, D)  # [B, J, D]
        return torch.randn(B, J, D, generator=generator, device=like.device, dtype=like.dtype)  # [B, J, D]

    def forward(
        self,
        local: Tensor,
        global_: Tensor,
        mask: Tensor | None = None,
        *,
        backbone: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> SetOutput:
        """μ, logσ (class docstring); PCME samples ``z_j = μ + e^{logσ} ε_j`` or PCME++'s (μ, σ) pair.

        Args:
            local: [B, N, D_in]; global_: [B, D]; mask: [B, N] bool or None.
            backbone: [B, N, D_bb] backbone features for the σ branch (None: ``local`` stands in, e.g. in unit tests
                with D_bb = D_in).
            generator: seeds ε (on the input's device) for reproducible samples.

        Returns:
            `SetOutput` with embeddings = samples [B, J, D] (not re-normalised), μ [B, 1, D] (eval, no sampling) or
            (μ, σ) [B, 2, D] (``output="mean_std"``); mean μ [B, D], logsigma [B, D]; attention [B, rows, N] (the
            mean's attention map, repeated for every row of embeddings).
        """
        _check_inputs(local, global_, mask, self.input_dim, self.embed_dim)
        B, N, _ = local.shape
        mean_out = self.mean_net(local, global_, mask)
        mean = mean_out.embeddings[:, 0]  # [B, D]
        logsigma = self.log_sigma(local, global_, mask, backbone)  # [B, D]
        if self.output == "mean_std":
            embeddings = torch.stack((mean, logsigma.exp()), dim=1)  # [B, 2, D]
        elif self.training or self.sample_in_eval:
            noise = self._noise(B, generator, local)  # [B, J, D]
            embeddings = mean[:, None, :] + logsigma.exp()[:, None, :] * noise  # [B, J, D]
        else:
            embeddings = mean[:, None, :]  # [B, 1, D]
        rows = embeddings.shape[1]
        return SetOutput(
            embeddings=embeddings,
            attention=mean_out.attention.expand(B, rows, N),  # [B, rows, N]: every row shares μ's attention
            global_embedding=F.normalize(global_, dim=-1),
            mean=mean,
            logsigma=logsigma,
        )


@HEADS.register("single_vector")
class SingleVectorHead(nn.Module):
    """VSE++ single-vector baseline (M§4.6): the set is the normalised global feature, K = 1.

    Args:
        embed_dim: D. num_embeddings: must be 1. input_dim: accepted for a uniform interface, unused.
        projection: apply a Linear(D, D) before normalising (default False: the encoder already projects).
    """

    def __init__(
        self,
        embed_dim: int = 1024,
        num_embeddings: int = 1,
        input_dim: int | None = None,
        projection: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_embeddings != 1:
            raise ValueError(f"single_vector head has num_embeddings=1, got {num_embeddings}")
        self.embed_dim, self.num_embeddings = embed_dim, 1
        self.input_dim = embed_dim if input_dim is None else input_dim
        self.proj = nn.Linear(embed_dim, embed_dim, device=device, dtype=dtype) if projection else nn.Identity()

    def forward(self, local: Tensor, global_: Tensor, mask: Tensor | None = None) -> SetOutput:
        """embeddings = rownorm(g)[:, None] (VSE++ M§4.6); ``local`` and ``mask`` are only shape-checked.

        Args:
            local: [B, N, D_in]; global_: [B, D]; mask: [B, N] bool or None.

        Returns:
            `SetOutput` with embeddings [B, 1, D] = elements, global_embedding [B, D].
        """
        _check_inputs(local, global_, mask, self.input_dim, self.embed_dim)
        glob = F.normalize(self.proj(global_), dim=-1)  # [B, D]
        return SetOutput(embeddings=glob[:, None, :], elements=glob[:, None, :], global_embedding=glob)
