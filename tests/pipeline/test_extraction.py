"""pipeline/extraction.py on a tiny `shapes` dataset: real EfficientNet-Lite0 (packaged weights) and MiniLM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.extraction import UnreadableImageError, WorkerPool, run_extraction, subset_index
from pipeline.shapes import generate_shapes
from setemb.data import read_karpathy, read_precomp
from setemb.feature_store import FeatureStore, FeatureStoreWriter

SIZES = {"train_images": 12, "val_images": 4, "test_images": 4, "image_size": 64}
FAST = {"items_per_unit": 5, "batch_size": 4, "workers": 1}


def make_shapes(root: Path) -> Path:
    """12/4/4 images at 64 px."""
    return generate_shapes(root, seed=0, **SIZES)


def break_images(src: Path, dst: Path, split: str = "train") -> tuple[Path, Path]:
    """Copy the dataset to ``dst``; truncate the 2nd image of ``split`` and delete its 4th. Returns both paths."""
    shutil.copytree(src, dst)
    index = read_karpathy(dst / "dataset.json", dst / "images", split)
    truncated, missing = index.image_paths[1], index.image_paths[3]
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing.unlink()
    return truncated, missing


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a finished store, compacted, keyed ``split/modality/name``."""
    store, out = FeatureStore.open(path), {}
    for split in store.splits:
        for modality in ("image", "text"):
            f = store.modality(split, modality).load_to_memory()
            out[f"{split}/{modality}/local"] = np.asarray(f.local_rows)
            out[f"{split}/{modality}/lengths"] = f.lengths
            out[f"{split}/{modality}/ids"] = np.asarray(f.ids)
            if f.global_features is not None:
                out[f"{split}/{modality}/global"] = f.global_features
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def train_index(shapes: Path):
    return read_karpathy(shapes / "dataset.json", shapes / "images", "train")


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory: pytest.TempPathFactory, train_index) -> Path:
    path = tmp_path_factory.mktemp("stores") / "clean.zarr"
    writer = FeatureStoreWriter(path)
    report = run_extraction(train_index, writer, "efficientnet_lite0", "minilm", **FAST)
    writer.finalize()
    assert (report.images, report.captions, report.rejected) == (12, 60, [])
    return path


def test_store_complete_with_shapes_and_caption_to_image(clean_store: Path, train_index) -> None:
    split = FeatureStore.open(clean_store)["train"]
    image, text = split.image, split.text
    assert image.attrs["grid"] == [7, 7] and image.attrs["num_units"] == 3  # 12 images in units of 5
    assert image.global_features.shape == (12, 1280) and image.global_features.dtype == np.float16
    assert (image.lengths == 49).all()
    local, glob, mask = image.batch([0, 11])
    assert local.shape == (2, 49, 1280) and mask.all() and glob.shape == (2, 1280)
    assert np.isfinite(local.numpy()).all() and local.abs().sum() > 0
    assert text.global_features.shape == (60, 384)
    assert text.ids == train_index.caption_ids and image.ids == train_index.image_ids
    np.testing.assert_array_equal(split.caption_to_image, np.repeat(np.arange(12), 5))
    assert (text.lengths >= 3).all() and (text.lengths <= text.attrs["max_tokens"]).all()
    t_local, _, t_mask = text.batch([0, 1])
    assert (t_local[~t_mask] == 0).all() and (t_local[t_mask].abs().sum(-1) > 0).all()


def test_rerun_of_written_units_does_nothing(clean_store: Path, train_index) -> None:
    before = store_arrays(clean_store)
    report = run_extraction(train_index, FeatureStoreWriter(clean_store), "efficientnet_lite0", "minilm", **FAST)
    assert report.timings["image"]["items"] == 0 and report.timings["text"]["items"] == 0
    after = store_arrays(clean_store)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_limit_keeps_first_images_and_their_captions(tmp_path: Path, train_index) -> None:
    writer = FeatureStoreWriter(tmp_path / "s.zarr")
    report = run_extraction(train_index, writer, "efficientnet_lite0", "minilm", limit=3, **FAST)
    writer.finalize()
    split = FeatureStore.open(tmp_path / "s.zarr")["train"]
    assert (report.images, report.captions) == (3, 15)
    assert split.image.ids == train_index.image_ids[:3] and split.text.ids == train_index.caption_ids[:15]


def test_subset_index_rebuilds_caption_to_image(train_index) -> None:
    sub = subset_index(train_index, [1, 4])
    assert sub.image_ids == [train_index.image_ids[1], train_index.image_ids[4]]
    assert sub.captions == train_index.captions[5:10] + train_index.captions[20:25]
    np.testing.assert_array_equal(sub.caption_to_image, np.repeat([0, 1], 5))


def test_bad_image_fail_names_file_and_param(tmp_path: Path, shapes: Path) -> None:
    truncated, missing = break_images(shapes, tmp_path / "broken")
    index = read_karpathy(tmp_path / "broken/dataset.json", tmp_path / "broken/images", "train")
    with pytest.raises(UnreadableImageError, match=rf"{missing.name}.*on_bad_image: skip"):
        run_extraction(index, FeatureStoreWriter(tmp_path / "a.zarr"), "efficientnet_lite0", "minilm", **FAST)
    missing.write_bytes(truncated.read_bytes())  # now only corrupt files: fails while decoding, in the first unit
    with pytest.raises(UnreadableImageError, match=rf"{truncated.name}.*on_bad_image: skip"):
        run_extraction(index, FeatureStoreWriter(tmp_path / "b.zarr"), "efficientnet_lite0", "minilm", **FAST)
    assert FeatureStoreWriter(tmp_path / "b.zarr").root.attrs["complete"] is False


def test_bad_image_skip_excludes_images_and_captions(tmp_path: Path, shapes: Path, clean_store: Path) -> None:
    truncated, missing = break_images(shapes, tmp_path / "broken")
    index = read_karpathy(tmp_path / "broken/dataset.json", tmp_path / "broken/images", "train")
    seen: list = []
    writer = FeatureStoreWriter(tmp_path / "s.zarr")
    report = run_extraction(
        index, writer, "efficientnet_lite0", "minilm", on_bad_image="skip", on_filtered=seen.append, **FAST
    )
    writer.finalize()
    assert [r["path"] for r in report.rejected] == [str(truncated), str(missing)] and seen == [report.rejected]
    assert report.rejected[1]["reason"] == "missing file" and report.rejected[0]["id"] == index.image_ids[1]
    split = FeatureStore.open(tmp_path / "s.zarr")["train"]
    kept = [0, 2, *range(4, 12)]
    assert split.image.ids == [index.image_ids[i] for i in kept]
    assert split.text.ids == [index.caption_ids[5 * i + j] for i in kept for j in range(5)]
    np.testing.assert_array_equal(split.caption_to_image, np.repeat(np.arange(10), 5))
    # the kept images' features equal those of the clean run (rows 0, 2, 4.. of it); units differ, values do not
    clean = FeatureStore.open(clean_store)["train"]
    np.testing.assert_array_equal(split.image.global_features, clean.image.global_features[kept])


def test_precomputed_regions_copy_rows_and_max_pool(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((4, 3, 16)).astype(np.float32)  # [n, R, D]
    np.save(tmp_path / "test_ims.npy", ims)
    (tmp_path / "test_caps.txt").write_text("".join(f"caption {i} of a small red circle\n" for i in range(20)))
    index, regions = read_precomp(tmp_path, "test")
    writer = FeatureStoreWriter(tmp_path / "s.zarr")
    run_extraction(index, writer, "precomputed", "minilm", regions=regions, items_per_unit=3, batch_size=2)
    writer.finalize()
    split = FeatureStore.open(tmp_path / "s.zarr")["test"]
    local, glob, mask = split.image.batch(range(4))
    np.testing.assert_array_equal(local.numpy(), ims.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(glob.numpy(), ims.max(1).astype(np.float16).astype(np.float32))
    assert mask.all() and split.text.global_features.shape == (20, 384)


def test_regions_of_wrong_shape_fail_clearly(tmp_path: Path) -> None:
    np.save(tmp_path / "test_ims.npy", np.zeros((4, 16, 3), np.float32))  # transposed (n, D, R)
    (tmp_path / "test_caps.txt").write_text("a caption\n" * 20)
    index, regions = read_precomp(tmp_path, "test")
    with pytest.raises(ValueError, match=r"\(n, R, D\).*got shape \(4, 16, 3\)"):
        run_extraction(index, FeatureStoreWriter(tmp_path / "s.zarr"), "precomputed", "minilm", regions=regions)


def test_glove_stores_token_ids_and_vocab_size(tmp_path: Path, train_index) -> None:
    from pipeline.text_backbones import Vocabulary

    vocab = Vocabulary.build(train_index.captions)
    vocab.save(tmp_path / "vocab.json")
    test = subset_index(train_index, range(2))
    writer = FeatureStoreWriter(tmp_path / "s.zarr")
    run_extraction(test, writer, "efficientnet_lite0", "glove", text_kwargs={"vocab": str(tmp_path / "vocab.json")},
                   **FAST)  # fmt: skip
    writer.finalize()
    text = FeatureStore.open(tmp_path / "s.zarr")["train"].text
    assert text.attrs["vocab_size"] == len(vocab) and text.global_features is None
    assert text.local(0).tolist() == vocab.encode(test.captions[0])


@pytest.mark.ray
@pytest.mark.slow  # ~25-30 s on 2 cores: Ray start plus two actors loading both backbones
def test_ray_actors_write_the_same_values_as_in_process(tmp_path: Path, train_index, clean_store: Path) -> None:
    writer = FeatureStoreWriter(tmp_path / "ray.zarr")
    with WorkerPool(2) as pool:
        run_extraction(train_index, writer, "efficientnet_lite0", "minilm", **{**FAST, "workers": 2}, pool=pool)
        assert pool._actors  # the Ray path ran
    writer.finalize()
    a, b = store_arrays(clean_store), store_arrays(tmp_path / "ray.zarr")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert json.loads(json.dumps(FeatureStore.open(tmp_path / "ray.zarr").attrs))["complete"] is True
