"""Encode ad-hoc queries (a caption, an image file) into embedding sets the way the stored sets were made.

A query goes through the same frozen backbone as the feature store (``params.extract``: backbone names, weights,
storage dtype) and the trained tower of the exported model (``paths.model``), so its set is comparable with the sets
of the embedding store / search index:

* text: ``create_text_backbone(extract.text_backbone).encode`` -> local ``[B, T, C]`` (token ids for glove),
  global ``[B, C]`` -> rounded to ``extract.dtype`` like the store -> text tower -> ``[B, L, D]``;
* image: ``decode_image`` -> ``preprocess`` -> visual backbone -> local ``[B, N, C]``, global ``[B, C]`` -> rounded ->
  image tower -> ``[B, K, D]``.

The backbone names are checked against the ones the model was trained on (``config.json`` ``features``), so a
params edit that would silently mix feature spaces fails instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.files import VOCAB_JSON, file_sha256
from pipeline.params import Params


def model_digest(model_dir: str | os.PathLike) -> str:
    """sha256 over the exported model files (weights, loss state, config): identifies the model an index serves.

    Raises:
        FileNotFoundError: a model file is missing (one line, with the `dvc repro train` hint).
    """
    from pipeline.checkpoints import CONFIG_FILE, LOSS_FILE, MODEL_FILE

    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for name in (MODEL_FILE, LOSS_FILE, CONFIG_FILE):
        path = model_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"no {name} in {model_dir}; train first (`dvc repro train`) or pass --model")
        digest.update(name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def read_model_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of an exported model (no weights loaded); FileNotFoundError with a hint when absent."""
    from pipeline.checkpoints import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {model_dir}; train first (`dvc repro train`) or pass --model")
    return json.loads(path.read_text())


def _storage_round(x: Tensor, dtype: str) -> Tensor:
    """Float features as the feature store returns them: stored in ``dtype``, read back as float32."""
    if not x.is_floating_point():
        return x.long()
    return x.to(getattr(torch, dtype)).float()


class QueryEncoder:
    """Frozen backbone + trained tower for one-off queries.

    Args:
        model_dir: exported model directory (``paths.model``; ``load_model`` reads it).
        params: validated params; ``extract`` gives the backbones, their weights and the feature dtype.
        device: where backbones and model run (default: CUDA when available, else CPU).

    Attributes:
        config: the model's ``config.json``. similarity: ``{"name", "kwargs"}`` the model was trained with.
    """

    def __init__(self, model_dir: str | os.PathLike, params: Params, device: str | torch.device | None = None) -> None:
        from pipeline.checkpoints import load_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, _, self.config = load_model(model_dir, self.device)
        self.extract = params.extract
        self.similarity: dict[str, Any] = self.config.get("similarity") or {}
        self._features: dict[str, Any] = self.config.get("features") or {}
        self._text: Any = None
        self._visual: Any = None

    def _trained_backbone(self, modality: str, configured: str) -> dict[str, Any]:
        """The feature summary of ``modality``; ValueError when params name another backbone than the model saw."""
        summary = self._features.get(modality) or {}
        trained = summary.get("backbone")
        if trained is not None and trained != configured:
            raise ValueError(
                f"the model was trained on {trained!r} {modality} features but params.extract names {configured!r}; "
                f"set extract.{'image' if modality == 'image' else 'text'}_backbone: {trained} or retrain"
            )
        return summary

    # ------------------------------------------------------------------------------------------------- backbones
    @property
    def text_backbone(self) -> Any:
        """The frozen text backbone (built on first use)."""
        if self._text is None:
            from pipeline.text_backbones import create_text_backbone

            name = self.extract.text_backbone
            summary = self._trained_backbone("text", name)
            kwargs: dict[str, Any] = {}
            if summary.get("max_tokens"):
                kwargs["max_length"] = int(summary["max_tokens"])
            if name == "glove":
                vocab = Path(self._features.get("path", "")) / VOCAB_JSON
                if not vocab.is_file():
                    raise FileNotFoundError(f"glove vocabulary {vocab} not found; run `dvc repro extract`")
                kwargs["vocab"] = vocab
            self._text = create_text_backbone(name, weights=self.extract.text_weights, device=self.device, **kwargs)
        return self._text

    @property
    def visual_backbone(self) -> Any:
        """The frozen visual backbone (built on first use); ValueError for precomputed region features."""
        if self._visual is None:
            from pipeline.image_backbones import create_visual_backbone

            name = self.extract.image_backbone
            if name == "precomputed":
                raise ValueError(
                    "image queries need a pixel backbone, but the model was trained on precomputed region features "
                    "(extract.image_backbone: precomputed); search with a text query instead"
                )
            summary = self._trained_backbone("image", name)
            self._visual = create_visual_backbone(
                name, weights=self.extract.image_weights, device=self.device,
                image_transform=self.image_transform(summary),
            )  # fmt: skip
        return self._visual

    def image_transform(self, summary: dict[str, Any]) -> str:
        """The test-time transform the model's image features were extracted with: the one its feature summary
        records; ``center_crop`` for a model trained before ``extract.image_transform`` existed (every store was
        centre-cropped then); ``extract.image_transform`` when the model records no features at all."""
        if "image_transform" in summary:
            return str(summary["image_transform"])
        return "center_crop" if summary.get("backbone") else self.extract.image_transform

    # -------------------------------------------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode_text(self, captions: Sequence[str]) -> Tensor:
        """Caption sets (M§1 text tower over the frozen text backbone).

        Args:
            captions: B non-empty strings.

        Returns:
            ``[B, L, D]`` float32 on CPU, rows L2-normalised.

        Raises:
            ValueError: no caption, or an empty one.
        """
        captions = list(captions)
        if not captions or any(not c.strip() for c in captions):
            raise ValueError(f"captions must be non-empty strings, got {captions!r}")
        local, global_, lengths = self.text_backbone.encode(captions)  # [B, T, C] (or [B, T] ids), [B, C], [B]
        B, T = local.shape[:2]
        mask = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # [B, T]
        dtype = self.extract.dtype
        local = _storage_round(local, dtype).to(self.device)
        global_ = None if global_ is None else _storage_round(global_, dtype).to(self.device)
        out = self.model.encode_text(local, global_, mask.to(self.device))
        return out.embeddings.float().cpu()  # [B, L, D]

    @torch.inference_mode()
    def encode_images(
        self, paths: Sequence[str | os.PathLike | Any], *, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """Image sets (M§1 image tower over the frozen visual backbone).

        Args:
            paths: B image files, or decoded RGB ``PIL.Image`` objects (an HTTP upload).
            return_attention: also return the head's attention of each element over the backbone grid.

        Returns:
            ``[B, K, D]`` float32 on CPU, rows L2-normalised; with ``return_attention`` the pair
            ``(embeddings, attention [B, K, N] float32 or None)`` (N grid cells, row-major).

        Raises:
            BadImageError: a file is missing or not a decodable image.
        """
        from PIL import Image

        from pipeline.image_backbones import decode_image

        if not paths:
            raise ValueError("paths must name at least one image")
        visual = self.visual_backbone
        decoded = [p if isinstance(p, Image.Image) else decode_image(p) for p in paths]
        images = torch.stack([visual.preprocess(im) for im in decoded])  # [B, 3, H, W]
        local, global_, _ = visual(images)  # [B, N, C], [B, C]
        B, N, _ = local.shape
        dtype = self.extract.dtype
        mask = torch.ones(B, N, dtype=torch.bool, device=self.device)  # [B, N] every grid cell is valid
        out = self.model.encode_image(
            _storage_round(local, dtype).to(self.device), _storage_round(global_, dtype).to(self.device), mask
        )
        embeddings = out.embeddings.float().cpu()  # [B, K, D]
        if not return_attention:
            return embeddings
        return embeddings, None if out.attention is None else out.attention[:, :, :N].float().cpu()  # [B, K, N]


__all__ = ["QueryEncoder", "model_digest", "read_model_config"]
