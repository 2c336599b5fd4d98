"""pipeline/devices.py: device resolution, and half precision measured against float32 on the same inputs.

The autocast checks run the real backbones (packaged EfficientNet-Lite0 and MiniLM weights) on `shapes` images and
captions: bfloat16 on CPU here, float16 on CUDA in the `gpu` tests. Bounds are ~1.5x the error measured on CPU
(EfficientNet-Lite0 bf16: global rel. error <= 0.038, grid-cell cosine >= 0.992; MiniLM bf16: rel. <= 0.009).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.devices import Compute, DeviceError, resolve_compute
from pipeline.image_backbones import create_visual_backbone, decode_image
from pipeline.random_bert import write_random_bert
from pipeline.text_backbones import create_text_backbone
from setemb.data import read_karpathy
from tests.pipeline.test_extraction import make_shapes

MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


def _no_cuda() -> bool:
    return False


def _cuda() -> bool:
    return True


def test_cpu_default_is_float32_and_auto_without_cuda_is_cpu() -> None:
    assert resolve_compute("cpu") == Compute("cpu", None) and Compute().is_default
    assert resolve_compute("auto", cuda_available=_no_cuda) == Compute("cpu", None)
    assert resolve_compute("cpu", "bfloat16") == Compute("cpu", "bfloat16")


def test_auto_with_cuda_is_float16_unless_forced_to_float32() -> None:
    local = {"cuda_available": _cuda, "cluster_gpus": lambda: None}  # no Ray cluster attached yet
    assert resolve_compute("auto", **local) == Compute("cuda", "float16")
    assert resolve_compute("cuda", "float32", **local) == Compute("cuda", None)
    assert resolve_compute("auto", **local).label == "cuda/float16" and resolve_compute("auto", **local).pin_memory


def test_auto_needs_ray_to_report_gpus_and_cuda_fails_clearly_without() -> None:
    assert resolve_compute("auto", cuda_available=_cuda, cluster_gpus=lambda: 0.0).device == "cpu"
    assert resolve_compute("auto", cuda_available=_cuda, cluster_gpus=lambda: 2.0).device == "cuda"
    with pytest.raises(DeviceError, match=r"cuda but the Ray cluster reports no GPUs; set extract.device"):
        resolve_compute("cuda", cuda_available=_cuda, cluster_gpus=lambda: 0.0)
    with pytest.raises(DeviceError, match=r"torch.cuda.is_available\(\) is False"):
        resolve_compute("cuda", cuda_available=_no_cuda)
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        resolve_compute("cpu", "float16")


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory: pytest.TempPathFactory):
    root = make_shapes(tmp_path_factory.mktemp("data") / "shapes")
    return read_karpathy(root / "dataset.json", root / "images", "train")


def _errors(half: torch.Tensor, full: torch.Tensor) -> tuple[float, float]:
    """Max relative L2 error and min cosine over the last dim."""
    half, full = half.float(), full.float()
    rel = (half - full).norm(dim=-1) / full.norm(dim=-1)
    return rel.max().item(), F.cosine_similarity(half, full, dim=-1).min().item()


def _visual_errors(index, device: str, dtype: str) -> dict[str, tuple[float, float]]:
    vis = create_visual_backbone("efficientnet_lite0", device=device)
    images = torch.stack([vis.preprocess(decode_image(p)) for p in index.image_paths[:8]])  # [8, 3, 224, 224]
    local32, global32, _ = vis(images)  # [8, 49, 1280], [8, 1280]
    compute = Compute(device, dtype)
    with compute.autocast_context():
        local16, global16, _ = vis(compute.to_device(images))
    assert local16.dtype == getattr(torch, dtype)  # autocast really ran the network in half precision
    return {"global": _errors(global16, global32), "local": _errors(local16, local32)}


def _text_errors(index, device: str, dtype: str, weights: str | None = None) -> dict[str, tuple[float, float]]:
    txt = create_text_backbone("minilm" if weights is None else "bert", weights=weights, device=device)
    local32, global32, lengths = txt.encode(index.captions[:20])  # [20, T, 384], [20, 384], [20]
    with Compute(device, dtype).autocast_context():
        local16, global16, _ = txt.encode(index.captions[:20])
    valid = torch.arange(local32.shape[1], device=lengths.device)[None, :] < lengths[:, None]  # [20, T]
    return {"global": _errors(global16, global32), "local": _errors(local16[valid], local32[valid])}


def test_bfloat16_autocast_on_cpu_stays_close_to_float32(shapes_train) -> None:
    vis = _visual_errors(shapes_train, "cpu", "bfloat16")
    assert vis["global"][0] < 0.06 and vis["global"][1] > 0.998, vis
    assert vis["local"][1] > 0.98, vis
    txt = _text_errors(shapes_train, "cpu", "bfloat16")
    assert 0 < txt["global"][0] < 0.015 and txt["local"][0] < 0.015 and txt["local"][1] > 0.9999, txt  # > 0: it ran


@pytest.mark.gpu
def test_float16_autocast_on_cuda_stays_close_to_float32(shapes_train, tmp_path) -> None:
    vis = _visual_errors(shapes_train, "cuda", "float16")
    assert vis["global"][0] < 0.02 and vis["global"][1] > 0.9998, vis
    assert vis["local"][1] > 0.995, vis
    # text: a MiniLM-shaped random BERT (the GPU image does not carry the 88 MB MiniLM package)
    bert = write_random_bert(tmp_path / "bert", shapes_train.captions, **MINILM_SHAPE)
    txt = _text_errors(shapes_train, "cuda", "float16", weights=str(bert))
    assert 0 < txt["global"][0] < 0.01 and txt["local"][1] > 0.9999, txt
