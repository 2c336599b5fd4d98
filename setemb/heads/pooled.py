"""Heads that pool the local features into one embedding per item or per slot, around the global feature:
PIE-Net (``pienet``, PVSE eq. 2-4, M§4.3), PCME / PCME++ (``probabilistic``, M§4.4 / M§4.4b), VSE++
(``single_vector``, M§4.6).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setemb.heads.common import HEADS, SetOutput, _check_inputs

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
