"""pipeline/reporting.py and pipeline/report.py: attention figures (files, pixel size, distinct panels), the gallery
in a real headless browser (tile count, ground-truth marks, images loaded), and the geometry / nearest-caption helpers.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from pipeline.params import Params, ReportParams
from pipeline.report import (
    FLOOR_WEIGHT,
    attention_grid,
    backbone_crop_box,
    figure_size,
    nearest_captions,
    overlay_attention,
    panel_boxes,
    spread,
)
from pipeline.reporting import GALLERY_HTML, run_report
from pipeline.shapes import generate_shapes, load_relevance
from setemb.data import read_karpathy
from setemb.embedding_store import EmbeddingStoreWriter
from setemb.feature_store import FeatureStoreWriter

runner = CliRunner()
K, L, D, GRID, CPI = 3, 2, 16, (7, 7), 5
N_TEST = 8
PEAKS = (8, 24, 40)  # cells (1, 1), (3, 3), (5, 5) of the 7x7 grid: one per element
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


# ------------------------------------------------------------------------------------------------ fixtures
def _attention(n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, K, 49]`` softmax maps, element k of every image peaked on a different cell."""
    logits = rng.normal(0.0, 0.5, size=(n, K, GRID[0] * GRID[1]))
    for k, cell in enumerate(PEAKS):
        logits[:, k, cell] += 6.0
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def build_tiny(root: Path) -> dict[str, Path]:
    """A tiny shapes dataset, a feature store holding only the test image group's layout (7x7 grid at 224 px) and an
    embedding store with random sets: captions are their image's set plus noise, so each caption's own image ranks
    first and an image's own captions rank on top."""
    shapes = generate_shapes(root / "shapes", train_images=1, val_images=1, test_images=N_TEST, image_size=64)
    index = read_karpathy(shapes / "dataset.json", shapes / "images", "test")
    rng = np.random.default_rng(0)

    features = FeatureStoreWriter(root / "features.zarr")
    group = features.require_modality(
        "test", "image", n=N_TEST, backbone="efficientnet_lite0", local_dim=4, global_dim=4, max_tokens=49,
        grid=GRID, unit_size=N_TEST, attrs={"image_size": 224},
    )  # fmt: skip
    group.write_unit(0, rng.normal(size=(N_TEST, 49, 4)), rng.normal(size=(N_TEST, 4)), index.image_ids)
    features.finalize()

    image = rng.normal(size=(N_TEST, K, D)).astype(np.float32)
    text = image[index.caption_to_image][:, :L] + 0.05 * rng.normal(size=(index.n_captions, L, D)).astype(np.float32)
    attrs = {"similarity": {"name": "smooth_chamfer", "kwargs": {"alpha": 16.0}}, "captions_per_image": CPI}
    writer = EmbeddingStoreWriter(root / "embeddings.zarr", attrs=attrs)
    writer.require_set("test/image", ids=index.image_ids, num_embeddings=K, embed_dim=D, attention_tokens=49,
                       unit_size=4).write_all(image, _attention(N_TEST, rng))  # fmt: skip
    writer.require_set("test/text", ids=index.caption_ids, num_embeddings=L, embed_dim=D,
                       caption_to_image=index.caption_to_image).write_all(text)  # fmt: skip
    writer.finalize()
    return {"root": root, "shapes": shapes, "features": root / "features.zarr", "embeddings": root / "embeddings.zarr"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report(tiny: dict[str, Path]) -> dict:
    out = tiny["root"] / "reports"
    result = run_report(
        Params(),
        embeddings=tiny["embeddings"],
        dataset_json=tiny["shapes"] / "dataset.json",
        image_root=tiny["shapes"] / "images",
        out=out,
        features=tiny["features"],
        relevance=tiny["shapes"] / "relevance.json",
    )
    return {**result, "out": out}


def chromium() -> str:
    """The headless browser; fails (never skips) with the install command when it is absent."""
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "chromium is not installed; the gallery test needs a real headless browser: `apt-get install -y chromium` "
        "(Debian/Ubuntu; CI must install it)"
    )


def browse(html: Path, tmp_path: Path, *extra: str) -> str:
    """Run headless chromium on ``html``; returns stdout (the DOM with ``--dump-dom``)."""
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *extra, html.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# ------------------------------------------------------------------------------------------------ attention figures
def test_attention_figures_have_the_documented_size_and_distinct_panels(report: dict) -> None:
    figures = report["figures"]
    assert len(figures) == min(ReportParams().num_images, N_TEST)
    panel = ReportParams().panel_px
    for path in figures:
        assert path.is_file() and path.parent.name == "attention"
        with Image.open(path) as im:
            assert im.size == figure_size(K, panel)
            pixels = np.asarray(im.convert("RGB")).astype(np.float32)
        crops = [pixels[top:bottom, left:right] for left, top, right, bottom in panel_boxes(K, panel)]
        assert all(c.std() > 5 for c in crops), "a panel is blank"
        for a in range(len(crops)):
            for b in range(a + 1, len(crops)):
                changed = (np.abs(crops[a] - crops[b]).max(axis=-1) > 40).mean()  # fraction of visibly different pixels
                assert changed > 0.005, f"panels {a} and {b} of {path.name} look the same"
        title_band = pixels[: panel_boxes(K, panel)[0][1]]
        assert (title_band < 100).mean() > 0.002, "no title text drawn"


def test_attention_overlay_follows_the_peak_cell_and_dims_outside_the_crop() -> None:
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    heat = np.zeros((7, 7), dtype=np.float32)
    heat[1, 5] = 1.0  # row 1, column 5: top right
    box = backbone_crop_box(64, 64, 224)  # (4, 4, 60, 60)
    out = overlay_attention(image, heat, box, colormap="gray", alpha=1.0).astype(int)
    assert out[0, 0].tolist() == [round(128 * 0.35)] * 3  # outside the crop
    cell = 56 / 7  # the grid covers the 56 px crop: cell (1, 5) is x in [44, 52), y in [12, 20)
    y, x = np.unravel_index(out[..., 0].argmax(), out.shape[:2])
    assert 4 + 5 * cell <= x < 4 + 6 * cell and 4 + 1 * cell <= y < 4 + 2 * cell
    assert out[y, x, 0] > 200  # white at the peak
    assert abs(out[60 - 2, 6, 0] - (1 - FLOOR_WEIGHT) * 128) <= 1  # black at the floor weight far away


def test_attention_grid_is_row_major() -> None:
    att = torch.zeros(2, 52)  # 49 cells + 3 padding tokens
    att[0, 10] = 1.0  # row 1, column 3
    att[1, 48] = 1.0
    maps = attention_grid(att, (7, 7))
    assert maps.shape == (2, 7, 7)
    assert maps[0, 1, 3] == 1 and maps[1, 6, 6] == 1 and maps.sum() == 2
    with pytest.raises(ValueError, match="7x7"):
        attention_grid(torch.zeros(2, 40), (7, 7))


def test_backbone_crop_box_matches_resize_256_centre_crop_224() -> None:
    assert backbone_crop_box(128, 128, 224) == (8.0, 8.0, 120.0, 120.0)
    x0, y0, x1, y1 = backbone_crop_box(640, 480, 224)  # resize to 341 x 256, crop 224 x 224 from (58, 16)
    assert x1 - x0 == pytest.approx(224 * 640 / 341) and y1 - y0 == pytest.approx(224 * 480 / 256)
    assert (x0, y0) == (pytest.approx(58 * 640 / 341), pytest.approx(16 * 480 / 256))


def test_backbone_crop_box_is_the_whole_image_after_resize() -> None:
    assert backbone_crop_box(640, 480, 224, "resize") == (0.0, 0.0, 640.0, 480.0)
    assert backbone_crop_box(128, 128, 224, "center_crop") == backbone_crop_box(128, 128, 224)  # unrecorded = crop
    with pytest.raises(ValueError, match="resize or center_crop"):
        backbone_crop_box(128, 128, 224, "pad")


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), C=st.integers(1, 9), L=st.integers(1, 3), block=st.integers(1, 4), seed=st.integers(0, 99))
def test_nearest_captions_matches_the_naive_max_over_caption_elements(B: int, C: int, L: int, block: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    elements, captions = torch.randn(B, 2, 5, generator=g), torch.randn(C, L, 5, generator=g)
    cos, index = nearest_captions(elements, captions, block_size=block)
    for b in range(B):
        for k in range(2):
            per_caption = [
                max(torch.cosine_similarity(elements[b, k], captions[c, j], dim=0).item() for j in range(L))
                for c in range(C)
            ]
            assert cos[b, k].item() == pytest.approx(max(per_caption), abs=1e-5)
            assert per_caption[index[b, k]] == pytest.approx(max(per_caption), abs=1e-5)


def test_spread_is_even_and_distinct() -> None:
    assert spread(10, 5) == [0, 2, 4, 7, 9] and spread(3, 6) == [0, 1, 2] and spread(0, 5) == [] and spread(5, 0) == []


# ------------------------------------------------------------------------------------------------ gallery
def _tiles(dom: str, direction: str) -> list[list[str]]:
    """Per query of ``direction``: the ``data-kind`` of its tiles in rank order."""
    queries = re.findall(rf'<article class="query" data-direction="{direction}">(.*?)</article>', dom, re.S)
    return [re.findall(r'class="tile (\w+)" data-rank="\d+" data-kind="(\w+)"', q) for q in queries]


def test_gallery_renders_in_headless_chromium_with_all_tiles_and_images(report: dict, tiny, tmp_path: Path) -> None:
    rp = ReportParams()
    gallery = report["out"] / GALLERY_HTML
    assert gallery.is_file()
    text = gallery.read_text()
    assert "http://" not in text and "https://" not in text and "<link" not in text  # offline, self-contained
    dom = browse(gallery, tmp_path, "--dump-dom")
    assert dom.count('class="tile ') == (rp.num_text_queries + rp.num_image_queries) * rp.top_k == report["tiles"]
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, "the load script did not run"
    n_img_tiles = rp.num_text_queries * rp.top_k
    assert int(total.group(1)) == n_img_tiles + rp.num_image_queries + len(report["figures"])
    assert loaded.group(1) == total.group(1), "some images did not load"
    assert 'class="broken"' not in dom

    # ground truth: each caption's own image ranks first (captions are their image's set plus noise), every image
    # query's own 5 captions fill its top 5; other tiles are "relevant" exactly where the relevance file says so
    t2i, i2t = _tiles(dom, "t2i"), _tiles(dom, "i2t")
    assert len(t2i) == rp.num_text_queries and len(i2t) == rp.num_image_queries
    assert all(tiles[0] == ("original", "original") for tiles in t2i)
    assert all(kind == "original" for tiles in i2t for kind, _ in tiles)
    index = read_karpathy(tiny["shapes"] / "dataset.json", tiny["shapes"] / "images", "test")
    rel = load_relevance(tiny["shapes"] / "relevance.json", "test", index)  # [C, N]
    ids = {i: n for n, i in enumerate(index.image_ids)}
    queries = re.findall(r'data-direction="t2i">(.*?)</article>', dom, re.S)
    for c, query in zip(spread(index.n_captions, rp.num_text_queries), queries, strict=True):
        for kind, image_id in re.findall(r'data-kind="(\w+)"><img src="[^"]+" alt="image ([^"]+)"', query):
            i = ids[image_id]
            expected = "original" if index.caption_to_image[c] == i else ("relevant" if rel[c, i] else "other")
            assert kind == expected


def test_gallery_screenshot_is_not_blank(report: dict, tmp_path: Path) -> None:
    shot = tmp_path / "gallery.png"
    browse(report["out"] / GALLERY_HTML, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        pixels = np.asarray(im.convert("RGB")).astype(np.float32)
    assert pixels.std() > 20  # text, thumbnails and coloured borders, not an empty page
