"""stages/extract.py: the CLI wiring, exit codes, fingerprint/resume rules and a real SIGKILL-then-resume run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from setemb.feature_store import FeatureStore
from stages.extract import app
from tests.pipeline.test_extraction import break_images, make_shapes, store_arrays

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("data") / "shapes")


def write_params(path: Path, **extract) -> Path:
    extract = {"items_per_unit": 2, "batch_size": 2, "workers": 1, "splits": ["test"], **extract}
    path.write_text(yaml.safe_dump({"extract": extract}))
    return path


def cli(tmp_path: Path, data: Path, *extra: str, params: Path | None = None, out: str = "f.zarr"):
    params = params or write_params(tmp_path / "params.yaml")
    args = ["--params", str(params), "--dataset-json", str(data / "dataset.json"), "--image-root", str(data / "images")]
    return runner.invoke(app, [*args, "--out", str(tmp_path / out), "--quiet", *extra])


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_help_exits_zero() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--backbone" in result.stdout and "--limit" in result.stdout


def test_cli_writes_a_complete_store_then_is_a_noop(tmp_path: Path, shapes: Path) -> None:
    result = cli(tmp_path, shapes)
    assert result.exit_code == 0, result.output
    assert "(created)" in result.stdout
    arrays = store_arrays(tmp_path / "f.zarr")
    assert arrays["test/image/global"].shape == (4, 1280) and arrays["test/text/global"].shape == (20, 384)
    meta = tmp_path / "f.zarr" / "zarr.json"
    attrs = json.loads(meta.read_text())["attributes"]
    assert (
        attrs["complete"] is True and attrs["image_backbone"] == "efficientnet_lite0" and attrs["dataset"] == "shapes"
    )
    stamp = meta.stat().st_mtime_ns
    again = cli(tmp_path, shapes, "--workers", "3")  # workers are not part of the fingerprint
    assert again.exit_code == 0 and "(complete)" in again.stdout and meta.stat().st_mtime_ns == stamp


def test_limit_and_fingerprint_change_wipes(tmp_path: Path, shapes: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert cli(tmp_path, shapes, "--limit", "1").exit_code == 0
    assert store_arrays(tmp_path / "f.zarr")["test/text/ids"].shape == (5,)
    (tmp_path / "f.zarr" / "stale.txt").write_text("from the old run")
    result = cli(tmp_path, shapes, "--limit", "3")
    assert result.exit_code == 0 and "(created)" in result.stdout
    assert "wiping it" in caplog.text and not (tmp_path / "f.zarr" / "stale.txt").exists()
    assert store_arrays(tmp_path / "f.zarr")["test/image/ids"].shape == (3,)


def test_unknown_backbone_is_a_usage_error(tmp_path: Path, shapes: Path) -> None:
    result = cli(tmp_path, shapes, "--backbone", "vgg16")
    assert result.exit_code == 2 and "image_backbone" in error_line(result)
    assert not (tmp_path / "f.zarr").exists()


def test_device_cuda_without_cuda_exit_1_and_compute_enters_the_fingerprint(tmp_path: Path, shapes: Path) -> None:
    from pipeline.devices import Compute
    from pipeline.feature_cache import fingerprint
    from pipeline.params import ExtractParams

    if not __import__("torch").cuda.is_available():
        result = cli(tmp_path, shapes, "--device", "cuda")
        assert result.exit_code == 1 and "extract.device is cuda but" in error_line(result)
        assert not (tmp_path / "f.zarr").exists()
    extract = ExtractParams()
    base = fingerprint(extract, None, {})
    assert fingerprint(extract, None, {}, Compute()) == base  # CPU float32 stores keep their fingerprint
    assert fingerprint(ExtractParams(device="cpu", workers=3), None, {}, Compute()) == base
    assert len({base, fingerprint(extract, None, {}, Compute("cuda", "float16")),
                fingerprint(extract, None, {}, Compute("cpu", "bfloat16"))}) == 3  # fmt: skip


def test_image_transform_enters_the_fingerprint_except_the_legacy_centre_crop() -> None:
    import hashlib

    from pipeline.feature_cache import fingerprint
    from pipeline.params import ExtractParams

    resize, crop = ExtractParams(image_transform="resize"), ExtractParams(image_transform="center_crop")
    assert fingerprint(resize, None, {}) != fingerprint(crop, None, {})  # a changed transform re-extracts
    # center_crop hashes exactly as a store from before the param (no image_transform key), so such stores resume
    before = {k: v for k, v in crop.model_dump(mode="json").items()
              if k not in ("workers", "gpus_per_worker", "device", "precision", "image_transform")}  # fmt: skip
    blob = json.dumps({"v": 1, "extract": before, "limit": None, "data": {}}, sort_keys=True)
    assert fingerprint(crop, None, {}) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    regions = {"source": "precomp", "image_backbone": "precomputed"}  # no pixels: the transform is irrelevant
    assert fingerprint(ExtractParams(**regions, image_transform="resize"), None, {}) == fingerprint(
        ExtractParams(**regions, image_transform="center_crop"), None, {}
    )


def test_image_transform_option_changes_the_store_and_a_bad_one_is_a_usage_error(tmp_path: Path, shapes: Path) -> None:
    result = cli(tmp_path, shapes, "--image-transform", "crop")
    assert result.exit_code == 2 and "image_transform" in error_line(result) and "'center_crop'" in error_line(result)
    assert not (tmp_path / "f.zarr").exists()
    stores = {}
    for transform in ("resize", "center_crop"):
        result = cli(tmp_path, shapes, "--image-transform", transform, "--limit", "2", out=f"{transform}.zarr")
        assert result.exit_code == 0, result.output
        store = FeatureStore.open(tmp_path / f"{transform}.zarr")
        assert store.attrs["extract"]["image_transform"] == transform
        image = store.modality("test", "image")
        assert image.attrs["image_transform"] == transform and tuple(image.attrs["grid"]) == (7, 7)
        stores[transform] = store_arrays(tmp_path / f"{transform}.zarr")
    for key in ("test/image/local", "test/image/global", "test/image/lengths"):
        assert stores["resize"][key].shape == stores["center_crop"][key].shape  # same layout: 49 cells of 1280
    assert not np.array_equal(stores["resize"]["test/image/global"], stores["center_crop"]["test/image/global"])
    np.testing.assert_array_equal(stores["resize"]["test/text/global"], stores["center_crop"]["test/text/global"])


def test_missing_weights_exit_1(tmp_path: Path, shapes: Path) -> None:
    result = cli(tmp_path, shapes, "--backbone", "resnet152", "--weights", str(tmp_path / "nope.pth"))
    assert result.exit_code == 1 and "resnet152 weights not found" in error_line(result)
    result = cli(tmp_path, shapes, "--text-backbone", "bert", "--text-weights", str(tmp_path / "nobert"))
    assert result.exit_code == 1 and "bert weights not found" in error_line(result)


def test_empty_caption_exit_1(tmp_path: Path, shapes: Path) -> None:
    data = json.loads((shapes / "dataset.json").read_text())
    test = next(e for e in data["images"] if e["split"] == "test")
    test["sentences"][2]["raw"] = "  "
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(data))
    (tmp_path / "d" / "images").symlink_to(shapes / "images")
    result = cli(tmp_path, tmp_path / "d")
    assert result.exit_code == 1 and "empty caption" in error_line(result)


def test_bad_images_fail_or_skip(tmp_path: Path, shapes: Path) -> None:
    truncated, missing = break_images(shapes, tmp_path / "broken", split="test")
    result = cli(tmp_path, tmp_path / "broken")
    assert result.exit_code == 1 and missing.name in error_line(result) and "on_bad_image" in error_line(result)
    missing.write_bytes(truncated.read_bytes())
    result = cli(tmp_path, tmp_path / "broken")
    line = error_line(result)
    assert result.exit_code == 1 and truncated.name in line and "on_bad_image" in line
    assert json.loads((tmp_path / "f.zarr/zarr.json").read_text())["attributes"]["complete"] is False
    missing.unlink()

    params = write_params(tmp_path / "skip.yaml", on_bad_image="skip")
    result = cli(tmp_path, tmp_path / "broken", params=params)  # other params: the failed store is wiped
    assert result.exit_code == 0, result.output
    assert "2 images rejected" in result.stdout
    rejected = json.loads((tmp_path / "f.zarr" / "rejected.json").read_text())
    assert rejected["count"] == 2 and [r["path"] for r in rejected["splits"]["test"]] == [str(truncated), str(missing)]
    arrays = store_arrays(tmp_path / "f.zarr")
    assert arrays["test/image/ids"].shape == (2,) and arrays["test/text/ids"].shape == (10,)


def test_precomp_of_wrong_shape_exit_1(tmp_path: Path, shapes: Path) -> None:
    root = tmp_path / "precomp"
    root.mkdir()
    np.save(root / "test_ims.npy", np.zeros((4, 2048), np.float32))
    (root / "test_caps.txt").write_text("a red circle\n" * 20)
    result = cli(tmp_path, shapes, "--precomp-root", str(root), "--backbone", "precomputed")
    assert result.exit_code == 1 and "3-D array" in error_line(result)


def test_glove_vocabulary_from_train_captions_only(tmp_path: Path, shapes: Path) -> None:
    from pipeline.text_backbones import Vocabulary
    from setemb.data import read_karpathy

    result = cli(tmp_path, shapes, "--text-backbone", "glove", "--limit", "2")
    assert result.exit_code == 0, result.output
    vocab = Vocabulary.load(tmp_path / "f.zarr" / "vocab.json")
    train = read_karpathy(shapes / "dataset.json", shapes / "images", "train")
    assert vocab.words == Vocabulary.build(train.captions[:10]).words  # the first 2 train images' captions
    store = FeatureStore.open(tmp_path / "f.zarr")
    assert store.splits == ["test"] and store["test"].text.attrs["vocab_size"] == len(vocab)
    test = read_karpathy(shapes / "dataset.json", shapes / "images", "test")
    assert store["test"].text.local(3).tolist() == vocab.encode(test.captions[3])


def test_hdf5_regions_aligned_by_image_id(tmp_path: Path, shapes: Path) -> None:
    import h5py

    from setemb.data import read_karpathy

    test = read_karpathy(shapes / "dataset.json", shapes / "images", "test")
    regions = np.random.default_rng(0).standard_normal((4, 3, 16)).astype(np.float32)  # [n, R, D]
    with h5py.File(tmp_path / "butd.h5", "w") as f:
        f["features"] = regions
        f["ids"] = np.array([int(i) for i in test.image_ids[::-1]])  # rows in reverse image order
    result = cli(tmp_path, shapes, "--backbone", "precomputed", "--precomp-root", str(tmp_path / "butd.h5"))
    assert result.exit_code == 0, result.output
    image = FeatureStore.open(tmp_path / "f.zarr")["test"].image
    local, glob, _ = image.batch(range(4))
    np.testing.assert_array_equal(local.numpy(), regions[::-1].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(glob.numpy(), regions[::-1].max(1).astype(np.float16).astype(np.float32))


@pytest.mark.slow
def test_sigkill_then_rerun_resumes_and_equals_a_clean_run(tmp_path: Path, shapes: Path) -> None:
    params = write_params(tmp_path / "params.yaml")
    assert cli(tmp_path, shapes, params=params, out="clean.zarr").exit_code == 0
    cmd = [sys.executable, "-m", "stages.extract", "--params", str(params), "--out", str(tmp_path / "k.zarr")]
    cmd += ["--dataset-json", str(shapes / "dataset.json"), "--image-root", str(shapes / "images")]
    env = {**os.environ, "SETEMB_TEST_KILL_AFTER_UNITS": "1"}
    killed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    done = json.loads((tmp_path / "k.zarr/zarr.json").read_text())["attributes"]
    assert done["complete"] is False
    env.pop("SETEMB_TEST_KILL_AFTER_UNITS")
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming store" in resumed.stderr and "1 of 2 units already done" in resumed.stderr
    clean, again = store_arrays(tmp_path / "clean.zarr"), store_arrays(tmp_path / "k.zarr")
    assert clean.keys() == again.keys()
    for key in clean:
        np.testing.assert_array_equal(clean[key], again[key], err_msg=key)
