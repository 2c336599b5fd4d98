"""What the frozen feature extractors share (M§2; PLATFORM §2-§4): offline settings, weights errors, freezing.

The backbones themselves live in ``pipeline.image_backbones`` (images -> local grid / regions + global feature) and
``pipeline.text_backbones`` (captions -> per-token features + pooled feature, or GloVe token ids), each with its own
registry and ``create_*_backbone`` / ``list_*_backbones``. Weights are always read from local files: nothing here
downloads. A missing file raises `MissingWeightsError` with one line saying where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Before transformers / huggingface_hub read them (PLATFORM §3): both backbone modules import this one, and import
# timm / transformers (the readers) only inside their builders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on disk; the message (one line) names the expected file and how to provide it."""


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """A checkpoint file's state dict on CPU (unwrapped from a ``state_dict`` / ``model`` entry if nested)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen (what every ``create_*_backbone`` returns)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
