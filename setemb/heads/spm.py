"""The DivE set prediction module (``slot``, DivE eq. 1-5, M§1) and its softmax-over-inputs ablation (``transformer``).

Also the pieces they are built from, public for tests and reuse: sine positional codes, slot competition and the
attention normalisations, and the multi-head aggregation block.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from setemb.heads.common import HEADS, SetOutput, _check_inputs

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
