"""Two-tower set-embedding model: `Tower` = encoder + head per modality, `SetEmbeddingModel` = image + text towers.

`create_model(**config)` builds a model from plain, JSON-serialisable kwargs; the model keeps them as ``model.config``
so checkpoints can store the dict and rebuild with ``create_model(**config)``. Keys:

- ``embed_dim`` (D, 1024) and ``num_embeddings`` (K of the image set, 4); ``text_num_embeddings`` (L, default K).
- ``head``: head name (`setemb.heads.list_heads()`); ``head_kwargs``: kwargs for both heads, updated by
  ``image_head_kwargs`` / ``text_head_kwargs`` (e.g. ``{"positional_encoding": "sine2d"}`` for grids only).
  Each modality gets its own head weights (M§1). The head's ``input_dim`` defaults to the encoder's ``local_dim``.
- ``image_encoder`` / ``text_encoder``: encoder names (`setemb.encoders.list_encoders()`) and their
  ``*_encoder_kwargs`` (e.g. ``{"input_dim": 2048}``, ``{"vocab_size": 10000}``); ``embed_dim`` is passed to both.
- ``token_drop``: training-time size augmentation for both towers (M§5, 0.2 for ROI + bi-GRU), overridden per
  modality by ``image_token_drop`` / ``text_token_drop``.

``device`` and ``dtype`` are construction arguments, not part of ``model.config``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import Tensor, nn

from setemb.encoders import create_encoder, drop_tokens
from setemb.heads import HEADS, SetOutput, create_head

logger = logging.getLogger(__name__)


class Tower(nn.Module):
    """One modality: trainable encoder above a frozen backbone, then a set-prediction head.

    Args:
        encoder: ``forward(local, global_, mask) -> (local [B, N, D_l], global_ [B, D])``.
        head: ``forward(local, global_, mask) -> SetOutput``.
        token_drop: probability of dropping each valid token in training mode (`drop_tokens`, M§5).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, token_drop: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        self.encoder, self.head, self.token_drop = encoder, head, token_drop

    def forward(self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None) -> SetOutput:
        """Args: local [B, N, D_in] float or [B, N] token ids; global_ [B, Dg] or None; mask [B, N] bool or None.

        Returns:
            the head's `SetOutput` (embeddings [B, K, D]).
        """
        if self.training and self.token_drop > 0:
            if mask is None:
                mask = torch.ones(local.shape[:2], dtype=torch.bool, device=local.device)
            mask = drop_tokens(mask, self.token_drop)
        local_features, global_feature = self.encoder(local, global_, mask)  # [B, N, D_l], [B, D]
        if getattr(self.head, "reads_backbone", False):  # PCME's σ branch reads the frozen backbone features
            backbone = local if local.is_floating_point() else local_features  # bi-GRU: its word embeddings
            return self.head(local_features, global_feature, mask, backbone=backbone)
        return self.head(local_features, global_feature, mask)


class SetEmbeddingModel(nn.Module):
    """Image tower + text tower with separate weights (M§1).

    Args:
        image: `Tower` for images. text: `Tower` for captions.
        config: the plain kwargs the model was built from (`create_model`), kept for checkpoints.
    """

    def __init__(self, image: Tower, text: Tower, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.image, self.text = image, text
        self.config = copy.deepcopy(config) if config is not None else {}

    def encode_image(self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None) -> SetOutput:
        """Image set: local [P, N, D_in], global_ [P, Dg] or None, mask [P, N] -> embeddings [P, K, D]."""
        return self.image(local, global_, mask)

    def encode_text(self, local: Tensor, global_: Tensor | None = None, mask: Tensor | None = None) -> SetOutput:
        """Text set: local [C, N] ids or [C, N, D_in], global_ or None, mask [C, N] -> embeddings [C, L, D]."""
        return self.text(local, global_, mask)

    def forward(self, image_batch: dict[str, Tensor], text_batch: dict[str, Tensor]) -> tuple[SetOutput, SetOutput]:
        """Both towers on batch dicts with keys ``local``, ``global`` (may be None or absent), ``mask``.

        Returns:
            (image `SetOutput` [P, K, D], text `SetOutput` [C, L, D]).
        """
        for name, batch in (("image_batch", image_batch), ("text_batch", text_batch)):
            if "local" not in batch:
                raise ValueError(f"{name} needs key 'local' (and optionally 'global', 'mask'), got {sorted(batch)}")
        return (
            self.encode_image(image_batch["local"], image_batch.get("global"), image_batch.get("mask")),
            self.encode_text(text_batch["local"], text_batch.get("global"), text_batch.get("mask")),
        )


def _build_tower(
    encoder: str,
    encoder_kwargs: dict[str, Any],
    head: str,
    head_kwargs: dict[str, Any],
    embed_dim: int,
    num_embeddings: int,
    token_drop: float,
    dd: dict[str, Any],
) -> Tower:
    """Encoder then head, the head's input_dim defaulting to the encoder's local_dim (and, for heads that read the
    backbone features, ``backbone_dim`` to the encoder's input width: token ids -> its word embeddings)."""
    enc = create_encoder(encoder, embed_dim=embed_dim, **encoder_kwargs, **dd)
    local_dim = getattr(enc, "local_dim", embed_dim)
    kwargs = {"input_dim": local_dim, **head_kwargs}
    if getattr(HEADS.get(head), "reads_backbone", False):
        kwargs.setdefault("backbone_dim", getattr(enc, "input_dim", None) or local_dim)
    return Tower(enc, create_head(head, embed_dim=embed_dim, num_embeddings=num_embeddings, **kwargs, **dd), token_drop)


def create_model(
    *,
    embed_dim: int = 1024,
    num_embeddings: int = 4,
    head: str = "slot",
    head_kwargs: dict[str, Any] | None = None,
    image_head_kwargs: dict[str, Any] | None = None,
    text_head_kwargs: dict[str, Any] | None = None,
    image_encoder: str = "region",
    image_encoder_kwargs: dict[str, Any] | None = None,
    text_encoder: str = "bigru",
    text_encoder_kwargs: dict[str, Any] | None = None,
    text_num_embeddings: int | None = None,
    token_drop: float = 0.0,
    image_token_drop: float | None = None,
    text_token_drop: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SetEmbeddingModel:
    """Build a `SetEmbeddingModel` from plain kwargs (see the module docstring for the keys).

    Returns:
        the model, with ``model.config`` holding every kwarg except ``device`` and ``dtype``.
    """
    config = {
        "embed_dim": embed_dim,
        "num_embeddings": num_embeddings,
        "head": head,
        "head_kwargs": dict(head_kwargs or {}),
        "image_head_kwargs": dict(image_head_kwargs or {}),
        "text_head_kwargs": dict(text_head_kwargs or {}),
        "image_encoder": image_encoder,
        "image_encoder_kwargs": dict(image_encoder_kwargs or {}),
        "text_encoder": text_encoder,
        "text_encoder_kwargs": dict(text_encoder_kwargs or {}),
        "text_num_embeddings": text_num_embeddings,
        "token_drop": token_drop,
        "image_token_drop": image_token_drop,
        "text_token_drop": text_token_drop,
    }
    dd = {"device": device, "dtype": dtype}
    image = _build_tower(
        image_encoder,
        config["image_encoder_kwargs"],
        head,
        {**config["head_kwargs"], **config["image_head_kwargs"]},
        embed_dim,
        num_embeddings,
        token_drop if image_token_drop is None else image_token_drop,
        dd,
    )
    text = _build_tower(
        text_encoder,
        config["text_encoder_kwargs"],
        head,
        {**config["head_kwargs"], **config["text_head_kwargs"]},
        embed_dim,
        num_embeddings if text_num_embeddings is None else text_num_embeddings,
        token_drop if text_token_drop is None else text_token_drop,
        dd,
    )
    return SetEmbeddingModel(image, text, config)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """LayerNorm / BatchNorm weights and all biases (every parameter with ndim <= 1) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: SetEmbeddingModel,
    base_lr: float,
    head_lr_scale: float = 1.0,
    encoder_lr_scale: float = 1.0,
    *,
    weight_decay: float = 1e-4,
    image_encoder_lr_scale: float | None = None,
    text_encoder_lr_scale: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with per-module learning-rate scales (M§5).

    Heads get ``base_lr * head_lr_scale`` (SPM 0.1 on COCO), encoders ``base_lr * encoder_lr_scale`` unless the
    per-modality override is given (the official code scales the image projection/MLP with the SPM, ×0.1, and the
    text embedding/GRU ×1). Any other parameter gets ``base_lr``. Parameters with ndim <= 1 (norms, biases) get no
    weight decay. Frozen parameters and empty groups are left out; every group has a ``name`` key.

    Returns:
        list of dicts with keys ``name``, ``params``, ``lr``, ``weight_decay``, for ``torch.optim.AdamW``.
    """
    scales = {
        "image.head": head_lr_scale,
        "text.head": head_lr_scale,
        "image.encoder": encoder_lr_scale if image_encoder_lr_scale is None else image_encoder_lr_scale,
        "text.encoder": encoder_lr_scale if text_encoder_lr_scale is None else text_encoder_lr_scale,
    }
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = next((prefix for prefix in scales if name.startswith(prefix + ".")), "other")
        groups.setdefault((module, _no_decay(name, param)), []).append(param)
    return [
        {
            "name": f"{module}{'_no_decay' if no_decay else ''}",
            "params": params,
            "lr": base_lr * scales.get(module, 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (module, no_decay), params in groups.items()
    ]
