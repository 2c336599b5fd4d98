"""Tests of pipeline.ray_train: Ray Train wiring, local mode and DDP, resume, the exported best model."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.checkpoints import export_model, load_model
from pipeline.params import LossParams, ModelParams, OptimParams, Params, RayParams, TrainParams
from pipeline.ray_train import resolve_model_kwargs, run_training
from pipeline.train_data import feature_table
from setemb.feature_store import FeatureStore, FeatureStoreWriter
from setemb.training import encode_table, image_tower, text_tower, validate

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CPI, D_IMG, D_TXT, N_REG = 2, 8, 6, 4


def write_store(path, sizes=(("train", 24), ("val", 8)), seed=0):
    """A learnable store: each caption's tokens are a noisy linear map of its image's mean region feature."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D_IMG, D_TXT))
    writer = FeatureStoreWriter(path, attrs={"dataset": "synthetic"})
    for split, n in sizes:
        img_local = rng.normal(size=(n, N_REG, D_IMG)).astype(np.float32)
        c2i = np.repeat(np.arange(n), CPI)
        lengths = rng.integers(2, 5, size=len(c2i))
        txt_local = np.zeros((len(c2i), 4, D_TXT), np.float32)
        for c, (i, k) in enumerate(zip(c2i, lengths, strict=True)):
            txt_local[c, :k] = img_local[i].mean(0) @ W + 0.1 * rng.normal(size=(k, D_TXT))
        image = writer.require_modality(
            split, "image", n=n, backbone="toy", local_dim=D_IMG, global_dim=D_IMG, max_tokens=N_REG, unit_size=16
        )
        text = writer.require_modality(
            split, "text", n=len(c2i), backbone="toy", local_dim=D_TXT, global_dim=None, max_tokens=4, unit_size=16
        )
        for u in range(image.num_units):
            lo, hi = image.unit_items(u)
            image.write_unit(u, img_local[lo:hi], img_local[lo:hi].mean(1), [f"i{j}" for j in range(lo, hi)])
        for u in range(text.num_units):
            lo, hi = text.unit_items(u)
            text.write_unit(
                u,
                txt_local[lo:hi],
                None,
                [f"c{j}" for j in range(lo, hi)],
                lengths=lengths[lo:hi],
                caption_to_image=c2i[lo:hi],
            )
    writer.finalize()
    return path


def tiny_params(num_workers=0, epochs=2, seed=0, **optim) -> Params:
    train = TrainParams(
        images_per_batch=4,
        model=ModelParams(embed_dim=16, num_embeddings=2, head="slot", image_encoder="grid", text_encoder="token"),
        loss=LossParams(name="triplet", kwargs={"similarity": "smooth_chamfer", "margin": 0.2}),
        optim=OptimParams(lr=3e-3, epochs=epochs, warmup_epochs=0.5, amp=False, **optim),
        ray=RayParams(num_workers=num_workers, cpus_per_worker=1, max_failures=0),
        eval_block_size=16,
    )
    return Params(seed=seed, train=train, extract={"captions_per_image": CPI})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("features") / "features.zarr")


def val_tables(store_path):
    val = FeatureStore.open(store_path)["val"].load_to_memory()
    return feature_table(val.image), feature_table(val.text), val.caption_to_image


# ---------------------------------------------------------------------------------------------------- no Ray needed
def test_resolve_model_kwargs_fills_dims_from_the_store():
    model = ModelParams(image_encoder="grid", text_encoder="token").model_dump(mode="json")
    out = resolve_model_kwargs(model, {"local_dim": 8}, {"local_dim": 6})
    assert out["image_encoder_kwargs"] == {"input_dim": 8} and out["text_encoder_kwargs"] == {"input_dim": 6}
    assert model["image_encoder_kwargs"] == {}  # input untouched
    gru = ModelParams(text_encoder="bigru").model_dump(mode="json")
    with pytest.raises(ValueError, match="vocab_size"):
        resolve_model_kwargs(gru, {"local_dim": 8}, {"local_dim": None})
    assert resolve_model_kwargs(gru, {"local_dim": 8}, {"vocab_size": 50})["text_encoder_kwargs"] == {"vocab_size": 50}
    with pytest.raises(ValueError, match="token ids"):
        resolve_model_kwargs(model, {"local_dim": 8}, {"local_dim": None})


# ---------------------------------------------------------------------------------------------------- local mode
@pytest.mark.ray
def test_local_mode_trains_exports_and_reloads(store, tmp_path):
    params = tiny_params(num_workers=0, epochs=2)
    live_dir = tmp_path / "dvclive"
    result = run_training(params, features=store, storage_path=tmp_path / "ray", quiet=True, dvclive_dir=live_dir)

    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.best_checkpoint is None  # local mode: Ray does not persist checkpoints
    best = max(result.history, key=lambda h: h["val_rsum"])
    assert result.best_rsum == best["val_rsum"]
    assert json.loads((live_dir / "metrics.json").read_text())["train_loss"] == pytest.approx(
        result.history[-1]["train_loss"]
    )

    model, loss_fn, config = load_model(result.best_model)
    assert config["epoch"] == best["epoch"] and config["model"]["image_encoder_kwargs"]["input_dim"] == D_IMG
    img_tab, txt_tab, c2i = val_tables(store)
    # the reloaded model reproduces the best epoch's validation exactly
    again = validate(
        model,
        img_tab,
        txt_tab,
        c2i,
        similarity=config["similarity"]["name"],
        similarity_kwargs=config["similarity"]["kwargs"],
        captions_per_image=CPI,
    )
    assert again == pytest.approx({k[4:]: v for k, v in best.items() if k.startswith("val_")})
    # a second reload (export of the export) gives identical embeddings
    copy, _, _ = load_model(export_model(result.best_model, tmp_path / "copy"))
    for tower in (image_tower, text_tower):
        tab = img_tab if tower is image_tower else txt_tab
        a = encode_table(tower(model), tab, 5).embeddings
        b = encode_table(tower(copy), tab, 5).embeddings
        assert torch.equal(a, b)


@pytest.mark.ray
def test_local_mode_resume_continues_the_epoch_counter(store, tmp_path):
    params = tiny_params(num_workers=0, epochs=2)
    first = run_training(params, features=store, storage_path=tmp_path, quiet=True, stop_after_epochs=1)
    assert [h["epoch"] for h in first.history] == [0]
    resumed = run_training(params, features=store, storage_path=tmp_path, quiet=True, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    straight = run_training(params, features=store, storage_path=tmp_path, run_name="straight", quiet=True)
    for a, b in zip(resumed.history, straight.history, strict=True):
        for key in ("train_loss", "val_rsum", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.ray
def test_pcme_loss_parameters_are_trained_and_saved(store, tmp_path):
    base = tiny_params(num_workers=0, epochs=1)
    model = base.train.model.model_copy(
        update={"head": "probabilistic", "num_embeddings": 1, "head_kwargs": {"num_samples": 3}}
    )
    train = base.train.model_copy(update={"model": model, "loss": LossParams(name="pcme", kwargs={"init_shift": 5.0})})
    params = base.model_copy(update={"train": train})
    result = run_training(params, features=store, storage_path=tmp_path, quiet=True)
    _, loss_fn, config = load_model(result.best_model)
    shift = float(loss_fn.shift.detach())
    assert shift != pytest.approx(5.0, abs=1e-6)  # learnt
    assert config["similarity"]["name"] == "match_probability"
    assert config["similarity"]["kwargs"]["shift"] == pytest.approx(2 * shift)  # evaluation scores as trained


# ---------------------------------------------------------------------------------------------------- DDP on Ray
@pytest.fixture(scope="module")
def ray_cluster():
    import logging

    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_ddp_two_workers_resume_matches_uninterrupted_run(store, tmp_path, ray_cluster):
    params = tiny_params(num_workers=2, epochs=2)
    first = run_training(params, features=store, storage_path=tmp_path, run_name="split", stop_after_epochs=1)
    assert [h["epoch"] for h in first.history] == [0]
    assert first.best_checkpoint is not None and first.best_checkpoint.is_dir()
    resumed = run_training(params, features=store, storage_path=tmp_path, run_name="split", resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    straight = run_training(params, features=store, storage_path=tmp_path, run_name="straight")
    assert straight.history[-1]["train_loss"] < straight.history[0]["train_loss"]
    for a, b in zip(resumed.history, straight.history, strict=True):
        for key in ("train_loss", "train_triplet", "val_rsum", "val_i2t_r1", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert resumed.metrics["epoch"] == 1 and resumed.metrics["train_loss"] == pytest.approx(
        straight.metrics["train_loss"], abs=1e-5
    )
    # the best Ray checkpoint exports to a model that reloads without Ray
    model, _, config = load_model(export_model(straight.best_checkpoint, tmp_path / "exported"))
    assert config["val_rsum"] == straight.best_rsum
    shutil.rmtree(tmp_path / "exported")


def test_bigru_word_embeddings_start_from_the_extracted_glove_vectors(tmp_path) -> None:
    """The extract stage saves GloVe vectors beside the vocabulary; training must start the bi-GRU from them."""
    from pipeline.files import GLOVE_VECTORS
    from pipeline.ray_train import _init_word_vectors
    from setemb.model import create_model

    text_kwargs = {"vocab_size": 7, "word_dim": 4, "hidden_dim": 8}
    kwargs = dict(embed_dim=8, num_embeddings=2, head="slot", head_kwargs={"attention_dim": 8},
                  image_encoder="grid", image_encoder_kwargs={"input_dim": 6},
                  text_encoder="bigru", text_encoder_kwargs=text_kwargs)  # fmt: skip
    model = create_model(**kwargs)
    assert not _init_word_vectors(model, tmp_path)  # no vectors file: the random init stays
    vectors = np.arange(28, dtype=np.float32).reshape(7, 4)
    np.save(tmp_path / GLOVE_VECTORS, vectors)
    assert _init_word_vectors(model, tmp_path)
    np.testing.assert_array_equal(model.text.encoder.embedding.weight.detach().numpy(), vectors)
    np.save(tmp_path / GLOVE_VECTORS, vectors[:, :3])
    with pytest.raises(ValueError, match="word_dim"):
        _init_word_vectors(create_model(**kwargs), tmp_path)


@pytest.mark.ray
def test_training_streams_the_store_and_never_reads_a_whole_split(tmp_path, monkeypatch):
    """Every read of feature rows on the training path (train epochs and validation) is one bounded block."""
    from setemb.feature_store import ModalityFeatures
    from tests.setemb.test_streaming import CountingRows

    path = write_store(tmp_path / "features.zarr", sizes=(("train", 96), ("val", 32)))
    block = 8
    proxies: list[CountingRows] = []
    plain_local, plain_global = ModalityFeatures.local_rows.fget, ModalityFeatures.global_rows.fget

    def counted(getter, rows_per_item):
        def wrap(self):
            array = getter(self)
            if array is None:
                return None
            # a block of images holds `block` items, of captions block * CPI items (at most 4 rows each)
            limit = min(array.shape[0] - 1, block * CPI * rows_per_item) if rows_per_item else block * CPI
            proxies.append(CountingRows(array, max_rows=limit))
            return proxies[-1]

        return property(wrap)

    monkeypatch.setattr(ModalityFeatures, "local_rows", counted(plain_local, N_REG))
    monkeypatch.setattr(ModalityFeatures, "global_rows", counted(plain_global, 0))
    params = tiny_params(num_workers=0, epochs=2)
    params = params.model_copy(
        update={
            "train": params.train.model_copy(
                update={"data": params.train.data.model_copy(update={"block_images": block, "window_blocks": 2})}
            )
        }
    )
    result = run_training(params, features=path, storage_path=tmp_path / "ray", quiet=True)
    assert [h["epoch"] for h in result.history] == [0, 1] and "val_rsum" in result.history[-1]
    reads = [r for p in proxies for r in p.reads]
    assert len(reads) > 8  # the split was read in many blocks, each within the bound (CountingRows asserts it)


def test_rank0_progress_goes_to_the_driver_channel_and_summaries_are_one_line():
    from pipeline.train_console import Progress, epoch_summary

    class Channel(list):
        def put_nowait(self, item):
            self.append(item)

    channel = Channel()
    progress = Progress(total=10, epoch=3, enabled=True, channel=channel)
    progress(5, {"loss": 0.5})
    progress(10, {"loss": 0.25})
    progress.close()
    assert progress.bar is None  # the driver draws the bar, not the worker
    assert channel == [
        {"epoch": 3, "steps": 5, "total": 10, "loss": 0.5},
        {"epoch": 3, "steps": 10, "total": 10, "loss": 0.25},
    ]
    line = epoch_summary(
        {"epoch": 3, "train_loss": 0.12345, "val_rsum": 140.24, "best_val_rsum": 141.0, "epoch_time_s": 12.34}, 15
    )
    assert line == "epoch 4/15: loss 0.1235, val RSUM 140.2 (best 141.0), 12.3 s"
    assert "\n" not in line
