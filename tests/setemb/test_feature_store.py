"""Zarr feature store: round trips, parallel units, resume, completion marker."""

from __future__ import annotations

import pickle
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setemb.feature_store import FeatureStore, FeatureStoreWriter
from setemb.store import IncompleteStoreError

D, DG = 5, 3


def _text_items(n: int, seed: int = 0, max_tokens: int = 6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_tokens + 1, size=n)
    local = [rng.normal(size=(k, D)).astype(np.float32) for k in lengths]
    glob = rng.normal(size=(n, DG)).astype(np.float32)
    ids = [f"cap{i}" for i in range(n)]
    c2i = np.arange(n) // 2
    return local, glob, ids, c2i


def _image_items(n: int, seed: int = 1, grid: int = 4):
    rng = np.random.default_rng(seed)
    local = rng.normal(size=(n, grid, D)).astype(np.float32)  # fixed number of rows: a 2x2 grid
    glob = local.mean(1)
    return local, glob, [f"img{i}" for i in range(n)]


def _create(path, n_text=11, n_image=6, unit_size=3):
    w = FeatureStoreWriter(path, attrs={"dataset": "tiny"})
    text = w.require_modality(
        "train",
        "text",
        n=n_text,
        backbone="minilm",
        local_dim=D,
        global_dim=DG,
        max_tokens=6,
        unit_size=unit_size,
        rows_per_chunk=8,
    )
    image = w.require_modality(
        "train",
        "image",
        n=n_image,
        backbone="grid",
        local_dim=D,
        global_dim=D,
        max_tokens=4,
        grid=(2, 2),
        unit_size=unit_size,
        rows_per_chunk=8,
    )
    return w, text, image


def _write_units(text, image, units_text, units_image, data_text, data_image):
    local, glob, ids, c2i = data_text
    for u in units_text:
        lo, hi = text.unit_items(u)
        text.write_unit(u, local[lo:hi], glob[lo:hi], ids[lo:hi], caption_to_image=c2i[lo:hi])
    ilocal, iglob, iids = data_image
    for u in units_image:
        lo, hi = image.unit_items(u)
        image.write_unit(u, torch.from_numpy(ilocal[lo:hi]), iglob[lo:hi], iids[lo:hi])


def _write_full(path):
    data_text, data_image = _text_items(11), _image_items(6)
    w, text, image = _create(path)
    _write_units(text, image, range(text.num_units), range(image.num_units), data_text, data_image)
    w.finalize()
    return data_text, data_image


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def test_round_trip_with_two_threaded_writers(tmp_path):
    data_text, data_image = _text_items(11), _image_items(6)
    w, text, image = _create(tmp_path / "f.zarr")
    assert text.num_units == 4 and image.num_units == 2
    # Two writers (separate objects, as in two Ray tasks) write distinct units at the same time.
    writers = [w.modality("train", "text"), pickle.loads(pickle.dumps(w.modality("train", "text")))]
    threads = [
        threading.Thread(target=_write_units, args=(writers[k], image, range(k, 4, 2), [k], data_text, data_image))
        for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.finalize()

    store = FeatureStore.open(tmp_path / "f.zarr")
    assert store.splits == ["train"] and store.attrs["dataset"] == "tiny" and store.attrs["complete"] is True
    split = store["train"]
    local, glob, ids, c2i = data_text
    assert len(split.text) == 11 and split.text.ids == ids
    np.testing.assert_array_equal(split.caption_to_image, c2i)
    np.testing.assert_array_equal(split.text.lengths, [len(x) for x in local])
    np.testing.assert_array_equal(split.text.global_features.astype(np.float32), _fp16(glob))
    for i in range(11):
        torch.testing.assert_close(split.text.local(i), torch.from_numpy(_fp16(local[i])), rtol=0, atol=0)
    assert split.image.attrs["grid"] == [2, 2] and split.image.attrs["backbone"] == "grid"
    assert split.image.caption_to_image is None
    ilocal, _, iids = data_image
    assert split.image.ids == iids
    torch.testing.assert_close(split.image.local(5), torch.from_numpy(_fp16(ilocal[5])), rtol=0, atol=0)


def test_starts_are_chunk_aligned_per_unit(tmp_path):
    _write_full(tmp_path / "f.zarr")
    text = FeatureStore.open(tmp_path / "f.zarr")["train"].text
    rows_per_unit = text.attrs["rows_per_unit"]
    assert rows_per_unit % 8 == 0 and rows_per_unit >= 6 * 3
    first = text.starts[:: text.attrs["unit_size"]]
    np.testing.assert_array_equal(first, np.arange(len(first)) * rows_per_unit)


def test_padded_batch_and_mask(tmp_path):
    (local, glob, _, _), _ = _write_full(tmp_path / "f.zarr")
    text = FeatureStore.open(tmp_path / "f.zarr")["train"].text
    idx = [7, 0, 3, 3, 10]
    lx, gx, mask = text.batch(idx)
    lengths = [len(local[i]) for i in idx]
    B, N, Dx = lx.shape
    assert (B, Dx) == (5, D) and N == max(1, max(lengths)) and lx.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == lengths
    for b, i in enumerate(idx):
        torch.testing.assert_close(lx[b, : lengths[b]], torch.from_numpy(_fp16(local[i])), rtol=0, atol=0)
        assert not mask[b, lengths[b] :].any() and (lx[b, lengths[b] :] == 0).all()
    torch.testing.assert_close(gx, torch.from_numpy(_fp16(glob[idx])), rtol=0, atol=0)
    # The in-memory copy (compacted rows) gives the same batches.
    mem = text.load_to_memory()
    assert mem.in_memory and isinstance(mem.local_rows, np.ndarray)
    assert len(mem.local_rows) == sum(len(x) for x in local) < text.local_rows.shape[0]
    for got, want in zip(mem.batch(idx), (lx, gx, mask), strict=True):
        assert torch.equal(got, want)
    assert mem.ids == text.ids and torch.equal(mem.local(7), text.local(7))


def test_int_token_ids_without_global(tmp_path):
    w = FeatureStoreWriter(tmp_path / "g.zarr")
    tok = w.require_modality(
        "val",
        "text",
        n=4,
        backbone="glove",
        local_dim=None,
        global_dim=None,
        max_tokens=5,
        local_dtype="int32",
        unit_size=4,
        attrs={"vocab_size": 10},
    )
    padded = torch.tensor([[1, 9, 2, 0, 0], [1, 7, 8, 6, 2], [1, 2, 0, 0, 0], [1, 5, 2, 0, 0]])
    tok.write_unit(0, padded, None, [10, 11, 12, 13], lengths=[3, 5, 2, 3], caption_to_image=[0, 0, 1, 1])
    w.finalize()
    text = FeatureStore.open(tmp_path / "g.zarr").modality("val", "text")
    lx, gx, mask = text.batch([1, 2])
    assert gx is None and lx.dtype == torch.int64
    assert torch.equal(lx, padded[[1, 2]]) and mask.sum(1).tolist() == [5, 2]
    assert text.ids == ["10", "11", "12", "13"] and text.attrs["vocab_size"] == 10


def test_incomplete_and_missing_store_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; run `dvc repro extract`"):
        FeatureStore.open(tmp_path / "nope.zarr")
    w, text, image = _create(tmp_path / "f.zarr")
    _write_units(text, image, [0], [], _text_items(11), _image_items(6))
    with pytest.raises(IncompleteStoreError, match=r"is incomplete \(interrupted run\?\); re-run `dvc repro extract`"):
        FeatureStore.open(tmp_path / "f.zarr")
    with pytest.raises(ValueError, match="units not written"):
        w.finalize()
    with pytest.raises(IncompleteStoreError):
        FeatureStore.open(tmp_path / "f.zarr")


def _data_files(root: Path) -> dict[str, bytes]:
    """Every chunk file (everything but zarr.json metadata), by relative path."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_resume_after_kill_is_byte_identical(tmp_path):
    data_text, data_image = _write_full(tmp_path / "ref.zarr")

    path = tmp_path / "resumed.zarr"
    _, text, image = _create(path)
    _write_units(text, image, [0, 2], [1], data_text, data_image)
    # A unit killed half-way: local rows written, done marker not set; garbage that the resume must overwrite.
    rows = text.attrs["rows_per_unit"]  # unit 1 owns rows [rows, 2 * rows); its tail is always unused
    text.group["local"][rows : rows + 3] = np.full((3, D), 7.0)
    text.group["local"][2 * rows - 3 : 2 * rows] = np.full((3, D), 7.0)
    text.group["ids"][3:5] = np.array(["junk", "junk"])
    del text, image  # the process dies

    w, text, image = _create(path)  # the re-run reopens with the same layout
    assert w.remaining_units() == {"train/text": [1, 3], "train/image": [0]}
    assert text.remaining_units() == [1, 3] and image.remaining_units() == [0]
    _write_units(text, image, text.remaining_units(), image.remaining_units(), data_text, data_image)
    w.finalize()

    ref, got = _data_files(tmp_path / "ref.zarr"), _data_files(path)
    assert sorted(ref) == sorted(got)
    assert all(ref[k] == got[k] for k in ref)
    a, b = FeatureStore.open(tmp_path / "ref.zarr")["train"], FeatureStore.open(path)["train"]
    for name in ("local", "starts", "lengths", "global", "caption_to_image"):
        assert a.text._group[name][:].tobytes() == b.text._group[name][:].tobytes()
    assert a.text.ids == b.text.ids


def test_reopen_with_other_layout_fails(tmp_path):
    _create(tmp_path / "f.zarr")
    w = FeatureStoreWriter(tmp_path / "f.zarr")
    with pytest.raises(ValueError, match="different layout"):
        w.require_modality("train", "text", n=12, backbone="minilm", local_dim=D, global_dim=DG, max_tokens=6)


def test_write_unit_validates_shapes(tmp_path):
    _, text, _ = _create(tmp_path / "f.zarr")
    ok = np.zeros((2, D), np.float32)
    with pytest.raises(ValueError, match="local items"):
        text.write_unit(0, [ok, ok, np.zeros((7, D))], np.zeros((3, DG)), ["a", "b", "c"], caption_to_image=[0, 0, 0])
    with pytest.raises(ValueError, match="global_"):
        text.write_unit(0, [ok, ok, ok], np.zeros((3, DG + 1)), ["a", "b", "c"], caption_to_image=[0, 0, 0])
    with pytest.raises(ValueError, match="holds 3 items"):
        text.write_unit(0, [ok, ok], np.zeros((2, DG)), ["a", "b"], caption_to_image=[0, 0])
    with pytest.raises(ValueError, match="caption_to_image"):
        text.write_unit(0, [ok, ok, ok], np.zeros((3, DG)), ["a", "b", "c"])
    assert text.remaining_units() == [0, 1, 2, 3]


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=9),
    unit_size=st.integers(1, 4),
    ids=st.lists(st.text(min_size=0, max_size=6), min_size=9, max_size=9),
)
def test_ragged_lengths_and_string_ids_round_trip(lengths, unit_size, ids):
    n = len(lengths)
    rng = np.random.default_rng(n)
    local = [rng.normal(size=(k, 2)).astype(np.float16) for k in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        w = FeatureStoreWriter(Path(tmp) / "h.zarr")
        mw = w.require_modality(
            "test",
            "image",
            n=n,
            backbone="precomputed",
            local_dim=2,
            global_dim=2,
            max_tokens=4,
            unit_size=unit_size,
            rows_per_chunk=2,
        )
        for u in reversed(mw.remaining_units()):
            lo, hi = mw.unit_items(u)
            mw.write_unit(u, local[lo:hi], np.ones((hi - lo, 2)), ids[lo:hi])
        w.finalize()
        image = FeatureStore.open(Path(tmp) / "h.zarr").modality("test", "image")
        assert image.ids == ids[:n]
        for i in range(n):
            assert torch.equal(image.local(i), torch.from_numpy(local[i].astype(np.float32)))
        lx, _, mask = image.load_to_memory().batch(np.arange(n))
        assert mask.sum(1).tolist() == lengths
