"""Readers of Karpathy JSON and precomp features (setemb/data.py), on tiny files written under tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.data import (
    SplitIndex,
    align_region_rows,
    five_fold_slices,
    missing_images,
    read_karpathy,
    read_precomp,
)


def _entry(imgid: int, split: str, n_caps: int, *, cocoid: int | None = None, filepath: str | None = None) -> dict:
    sentids = [100 * imgid + j for j in range(n_caps)]
    entry = {
        "filename": f"img_{imgid}.jpg",
        "imgid": imgid,
        "split": split,
        "sentids": sentids,
        "sentences": [
            {"raw": f"caption {j} of image {imgid}", "tokens": [], "imgid": imgid, "sentid": s}
            for j, s in enumerate(sentids)
        ],
    }
    if cocoid is not None:
        entry["cocoid"] = cocoid
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _write(tmp_path: Path, images: list[dict], dataset: str) -> Path:
    path = tmp_path / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


@pytest.fixture
def coco_json(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        [
            _entry(0, "train", 5, cocoid=900, filepath="train2014"),
            _entry(1, "restval", 7, cocoid=901, filepath="val2014"),
            _entry(2, "val", 5, cocoid=902, filepath="val2014"),
            _entry(3, "test", 6, cocoid=903, filepath="val2014"),
            _entry(4, "test", 5, cocoid=904, filepath="val2014"),
        ],
        "coco",
    )


def test_coco_train_merges_restval_and_keeps_first_five(coco_json: Path, tmp_path: Path) -> None:
    index = read_karpathy(coco_json, tmp_path / "images", "train")
    assert index.image_ids == ["900", "901"]
    assert index.dataset == "coco" and index.name == "train"
    assert index.image_paths == [
        (tmp_path / "images" / "train2014" / "img_0.jpg").absolute(),
        (tmp_path / "images" / "val2014" / "img_1.jpg").absolute(),
    ]
    assert index.n_captions == 10 and index.captions_per_image == 5
    # the 7-caption restval image keeps its first 5 sentences, in order
    assert index.caption_ids[5:] == ["100", "101", "102", "103", "104"]
    assert index.captions[5] == "caption 0 of image 1"
    np.testing.assert_array_equal(index.caption_to_image, [0] * 5 + [1] * 5)
    assert index.caption_to_image.dtype == np.int64
    assert index.region_rows is None


def test_coco_test_and_dev_alias(coco_json: Path, tmp_path: Path) -> None:
    test = read_karpathy(coco_json, tmp_path, "test")
    assert test.image_ids == ["903", "904"] and test.n_captions == 10
    assert read_karpathy(coco_json, tmp_path, "dev").image_ids == ["902"]
    assert read_karpathy(coco_json, tmp_path, "restval").image_ids == ["901"]


def test_too_few_captions_raises_naming_image_or_drops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path, [_entry(0, "test", 5), _entry(1, "test", 4)], "flickr30k")
    with pytest.raises(ValueError, match=r"image 1 \(img_1.jpg\) has 4 captions"):
        read_karpathy(path, tmp_path, "test")
    with caplog.at_level(logging.WARNING):
        index = read_karpathy(path, tmp_path, "test", short_images="drop")
    assert index.image_ids == ["0"]
    assert "dropped 1" in caplog.text


def test_flickr_paths_ids_and_missing_images(tmp_path: Path) -> None:
    path = _write(tmp_path, [_entry(i, "train" if i < 2 else "test", 5) for i in range(4)], "flickr30k")
    index = read_karpathy(path, tmp_path / "flickr30k-images", "train")
    assert index.image_ids == ["0", "1"]
    assert index.image_paths == [(tmp_path / "flickr30k-images" / f"img_{i}.jpg").absolute() for i in range(2)]
    (tmp_path / "flickr30k-images").mkdir()
    index.image_paths[0].write_bytes(b"jpg")
    assert missing_images(index) == [index.image_paths[1]]


def test_image_id_falls_back_to_filename_stem(tmp_path: Path) -> None:
    entry = _entry(0, "val", 5)
    del entry["imgid"]
    index = read_karpathy(_write(tmp_path, [entry], "custom"), tmp_path, "val")
    assert index.image_ids == ["img_0"]


def test_empty_caption_names_sentid_and_image(tmp_path: Path) -> None:
    entry = _entry(3, "val", 5)
    entry["sentences"][2]["raw"] = "  \t "
    path = _write(tmp_path, [entry], "flickr30k")
    with pytest.raises(ValueError, match=r"sentid 302\) of image 3"):
        read_karpathy(path, tmp_path, "val")


def test_karpathy_file_and_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_karpathy(tmp_path / "nope.json", tmp_path, "train")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match='"images" list'):
        read_karpathy(bad, tmp_path, "train")
    path = _write(tmp_path, [_entry(0, "train", 5)], "coco")
    with pytest.raises(ValueError, match="unknown split 'training'"):
        read_karpathy(path, tmp_path, "training")
    with pytest.raises(ValueError, match=r"splits present: \['train'\]"):
        read_karpathy(path, tmp_path, "test")


def _precomp(tmp_path: Path, feats: np.ndarray, n_caps: int, split: str = "test", ids: list[str] | None = None) -> Path:
    np.save(tmp_path / f"{split}_ims.npy", feats)
    (tmp_path / f"{split}_caps.txt").write_text("".join(f"caption {c}\n" for c in range(n_caps)))
    if ids is not None:
        (tmp_path / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    return tmp_path


def test_precomp_per_image_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    feats = np.random.default_rng(0).standard_normal((10, 3, 8)).astype(np.float32)
    root = _precomp(tmp_path, feats, 50, ids=[str(1000 + i) for i in range(10)])
    with caplog.at_level(logging.INFO):
        index, features = read_precomp(root, "test")
    assert "per-image layout" in caplog.text
    assert isinstance(features, np.memmap) and features.shape == (10, 3, 8)
    assert index.n_images == 10 and index.n_captions == 50 and index.image_paths is None
    assert index.image_ids[3] == "1003" and index.captions[7] == "caption 7" and index.caption_ids[7] == "7"
    np.testing.assert_array_equal(index.region_rows, np.arange(10))
    np.testing.assert_array_equal(index.caption_to_image, np.repeat(np.arange(10), 5))


def test_precomp_per_caption_layout_keeps_every_fifth_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    per_image = np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float32)
    feats = np.repeat(per_image, 5, axis=0)  # [10, 3, 8] each image row 5 times
    root = _precomp(tmp_path, feats, 10, split="dev", ids=["7"] * 5 + ["9"] * 5)
    with caplog.at_level(logging.INFO):
        index, features = read_precomp(root, "val")  # falls back to dev
    assert "per-caption layout" in caplog.text
    assert index.n_images == 2 and index.image_ids == ["7", "9"] and index.name == "dev"
    np.testing.assert_array_equal(index.region_rows, [0, 5])
    np.testing.assert_array_equal(features[index.region_rows], per_image)


def test_precomp_per_caption_with_different_rows_raises(tmp_path: Path) -> None:
    feats = np.repeat(np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32), 5, axis=0)
    feats[7, 1, 2] += 1.0  # a row of image 1 differs
    root = _precomp(tmp_path, feats, 10)
    with pytest.raises(ValueError, match=r"rows 5..9 \(image 1\) are not identical"):
        read_precomp(root, "test")


def test_precomp_shape_and_count_errors(tmp_path: Path) -> None:
    root = _precomp(tmp_path, np.zeros((10, 8), np.float32), 50)
    with pytest.raises(ValueError, match=r"test_ims.npy: expected a 3-D array .* got shape \(10, 8\)"):
        read_precomp(root, "test")
    root = _precomp(tmp_path, np.zeros((10, 3, 8), np.float32), 7)
    with pytest.raises(ValueError, match="10 feature rows do not fit 7 captions"):
        read_precomp(root, "test")
    root = _precomp(tmp_path, np.zeros((10, 3, 8), np.float32), 50, ids=["a", "b"])
    with pytest.raises(ValueError, match="2 ids, expected 10"):
        read_precomp(root, "test")
    with pytest.raises(FileNotFoundError, match=r"train_ims.npy .*\['test'\]"):
        read_precomp(root, "train")


def test_precomp_empty_caption_names_line(tmp_path: Path) -> None:
    root = _precomp(tmp_path, np.zeros((2, 3, 8), np.float32), 10)
    lines = (root / "test_caps.txt").read_text().split("\n")
    lines[6] = " "
    (root / "test_caps.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="empty caption on line 7"):
        read_precomp(root, "test")


def test_align_region_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, [_entry(i, "test", 5, cocoid=50 + i) for i in range(3)], "coco")
    index = align_region_rows(read_karpathy(path, tmp_path, "test"), ["52", "99", "50", "51"])
    np.testing.assert_array_equal(index.region_rows, [2, 3, 0])
    with pytest.raises(ValueError, match=r"1 of 3 images .* \['52'\]"):
        align_region_rows(index, ["50", "51"])


def test_split_index_rejects_non_image_major_map() -> None:
    with pytest.raises(ValueError, match="image-major"):
        SplitIndex("x", ["a", "b"], None, ["c"] * 4, ["0", "1", "2", "3"], np.array([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="4 captions"):
        SplitIndex("x", ["a", "b"], None, ["c"] * 4, ["0", "1", "2", "3"], np.array([0, 0, 1, 1]), 3)


def test_five_fold_slices_coco() -> None:
    folds = five_fold_slices(5000)
    assert len(folds) == 5
    assert folds[2] == (slice(2000, 3000), slice(10000, 15000))
    with pytest.raises(ValueError, match="not a multiple"):
        five_fold_slices(4500)


@settings(max_examples=30, deadline=None)
@given(folds=st.integers(1, 6), fold_images=st.integers(1, 50), cpi=st.integers(1, 7))
def test_five_fold_slices_partition(folds: int, fold_images: int, cpi: int) -> None:
    n = folds * fold_images
    slices = five_fold_slices(n, fold_images, cpi)
    images = np.concatenate([np.arange(n)[s] for s, _ in slices])
    captions = np.concatenate([np.arange(n * cpi)[c] for _, c in slices])
    np.testing.assert_array_equal(images, np.arange(n))
    np.testing.assert_array_equal(captions, np.arange(n * cpi))
    c2i = np.repeat(np.arange(n), cpi)
    for s, c in slices:  # captions of a fold are exactly those of its images
        np.testing.assert_array_equal(np.unique(c2i[c]), np.arange(n)[s])
