"""stages/embed.py and stages/evaluate.py: embedding store contents, metrics / plots files, relevance metrics,
element subsets, similarity overrides and the streaming protocols against the dense reference in setemb.metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.checkpoints import load_model
from pipeline.params import Params
from pipeline.ray_train import run_training
from pipeline.shapes import RELATION_MARGIN, SHAPES_VERSION
from pipeline.train_data import feature_table
from setemb.embedding_store import EmbeddingStore, EmbeddingStoreWriter
from setemb.feature_store import FeatureStore
from setemb.metrics import map_at_r, r_precision, recall_at_k
from setemb.similarity import score
from setemb.training import encode_table, image_tower, text_tower
from stages.embed import app as embed_app
from stages.evaluate import app as evaluate_app
from tests.stages.test_train import CPI, N_REG, T_MAX, error_line, tiny_params_dict, write_params, write_store

runner = CliRunner()
N_VAL = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A feature store and a model trained for one short epoch in Ray local mode (the real export path)."""
    root = tmp_path_factory.mktemp("trained")
    store = write_store(root / "features.zarr", sizes=(("train", 16), ("val", N_VAL)))
    params = Params.model_validate(tiny_params_dict(optim={"epochs": 1, "amp": False}, limit_batches=2))
    result = run_training(params, features=store, storage_path=root / "training", quiet=True)
    return {"features": store, "model": result.best_model, "root": root}


def embed_cli(tmp_path: Path, trained: dict[str, Path], *extra: str, params: Path | None = None):
    params = params or write_params(tmp_path / "params.yaml")
    args = ["--params", str(params), "--features", str(trained["features"]), "--model", str(trained["model"])]
    return runner.invoke(embed_app, [*args, "--out", str(tmp_path / "emb.zarr"), "--quiet", *extra])


def evaluate_cli(tmp_path: Path, embeddings: Path, model: Path | None, *extra: str, evaluate: dict | None = None):
    data = tiny_params_dict()
    data["evaluate"].update(evaluate or {})
    params = write_params(tmp_path / "eval_params.yaml", data)
    args = ["--params", str(params), "--embeddings", str(embeddings)] + (["--model", str(model)] if model else [])
    out = ["--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path / "plots"), "--quiet"]
    return runner.invoke(evaluate_app, [*args, *out, *extra])


@pytest.fixture(scope="module")
def embedded(trained: dict[str, Path]) -> Path:
    out = trained["root"] / "embedded"
    out.mkdir()
    result = embed_cli(out, trained)
    assert result.exit_code == 0, result.output
    return out / "emb.zarr"


def dense_sims(image: torch.Tensor, text: torch.Tensor, name: str, kwargs: dict) -> torch.Tensor:
    """The full [n_images, C] reference matrix, one call, default tiling."""
    return score(image, text, similarity=name, **kwargs)


# ---------------------------------------------------------------------------------------------------------- embed
@pytest.mark.ray
def test_embed_writes_sets_matching_the_training_encoder(trained: dict[str, Path], embedded: Path) -> None:
    store = EmbeddingStore.open(embedded)
    assert store.names == ["val/image", "val/text"]
    img, txt = store["val/image"], store["val/text"]
    assert img.embeddings.shape == (N_VAL, 2, 16) and txt.embeddings.shape == (N_VAL * CPI, 2, 16)
    assert img.attention.shape == (N_VAL, 2, N_REG) and txt.attention.shape == (N_VAL * CPI, 2, T_MAX)
    features = FeatureStore.open(trained["features"])["val"].load_to_memory()
    assert img.ids == features.image.ids and txt.ids == features.text.ids
    assert np.array_equal(txt.caption_to_image, features.caption_to_image)
    model, _, config = load_model(trained["model"])
    assert store.attrs["similarity"] == config["similarity"] and store.attrs["model_epoch"] == config["epoch"]
    # the same numbers as the encoder the training loop validates with
    ref_img = encode_table(image_tower(model), feature_table(features.image), 5)
    ref_txt = encode_table(text_tower(model), feature_table(features.text), 5)
    torch.testing.assert_close(img.embeddings, ref_img.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt.embeddings, ref_txt.embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt.attention, ref_txt.attention, atol=1e-5, rtol=1e-5)


@pytest.mark.ray
def test_embed_is_a_noop_when_up_to_date_and_limit_rewrites(tmp_path: Path, trained: dict[str, Path]) -> None:
    assert embed_cli(tmp_path, trained).exit_code == 0
    meta = tmp_path / "emb.zarr" / "zarr.json"
    stamp = meta.stat().st_mtime_ns
    again = embed_cli(tmp_path, trained)
    assert again.exit_code == 0 and meta.stat().st_mtime_ns == stamp
    limited = embed_cli(tmp_path, trained, "--limit", "3")
    assert limited.exit_code == 0 and "val: 3 images x 2 and 6 captions x 2" in limited.stdout
    store = EmbeddingStore.open(tmp_path / "emb.zarr")
    assert store["val/text"].caption_to_image.max() == 2 and store.attrs["limit"] == 3


@pytest.mark.ray
def test_embed_without_attention_and_missing_split(tmp_path: Path, trained: dict[str, Path]) -> None:
    data = tiny_params_dict()
    data["embed"]["save_attention"] = False
    assert embed_cli(tmp_path, trained, params=write_params(tmp_path / "p.yaml", data)).exit_code == 0
    assert EmbeddingStore.open(tmp_path / "emb.zarr")["val/image"].attention is None
    data["embed"]["splits"] = ["test"]
    result = embed_cli(tmp_path, trained, params=write_params(tmp_path / "p.yaml", data))
    assert result.exit_code == 1 and "dvc repro extract" in error_line(result)


# ------------------------------------------------------------------------------------------------------- evaluate
@pytest.mark.ray
def test_evaluate_writes_metrics_plots_and_table(tmp_path: Path, trained: dict[str, Path], embedded: Path) -> None:
    result = evaluate_cli(tmp_path, embedded, trained["model"], "--relevance", "")
    assert result.exit_code == 0, result.output
    assert "rsum" in result.stdout and "our run" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"full", "circular_variance", "info"}
    info = metrics["info"]
    assert info["source"] == "our run" and info["protocol"] == "full" and info["similarity_source"] == "model"
    assert info["n_images"] == N_VAL and info["captions_per_image"] == CPI
    store = EmbeddingStore.open(embedded)
    image, text = store["val/image"].embeddings, store["val/text"].embeddings  # features are already image-major
    sim = store.attrs["similarity"]
    reference = recall_at_k(dense_sims(image, text, sim["name"], sim["kwargs"]), CPI)
    assert {k: metrics["full"][k] for k in reference} == pytest.approx(reference)
    assert metrics["full"]["i2t_r2"] >= metrics["full"]["i2t_r1"]
    assert set(metrics["circular_variance"]) == {"image_mean", "image_log_mean", "text_mean", "text_log_mean"}
    rows = json.loads((tmp_path / "plots" / "recall_at_k.json").read_text())
    assert [(r["direction"], r["k"]) for r in rows] == [(d, k) for d in ("i2t", "t2i") for k in (1, 2, 5)]
    assert all(r["recall"] == metrics["full"][f"{r['direction']}_r{r['k']}"] for r in rows)

    shown = runner.invoke(evaluate_app, ["--show", "--metrics", str(tmp_path / "metrics.json")])
    assert shown.exit_code == 0, shown.output
    assert f"{metrics['full']['rsum']:.2f}" in shown.stdout
    missing = runner.invoke(evaluate_app, ["--show", "--metrics", str(tmp_path / "none.json")])
    assert missing.exit_code == 1 and "dvc repro evaluate" in missing.output


def write_relevance(path: Path, store: EmbeddingStore, split: str = "val") -> np.ndarray:
    """A shapes-format relevance file: image i holds one shape, SHAPES[i % 3]; each caption names its image's shape.

    Returns:
        the expected ``[C, n_images]`` relevance in the store's caption order.
    """
    shapes = ("circle", "square", "star")
    image_ids, text = store[f"{split}/image"].ids, store[f"{split}/text"]
    scenes = [[[shapes[i % 3], "red", "small", 0.5, 0.5]] for i in range(len(image_ids))]
    queries = {
        cid: {"first": {"shape": shapes[int(i) % 3], "colour": None, "size": None}, "second": None, "relation": None}
        for cid, i in zip(text.ids, text.caption_to_image, strict=True)
    }
    splits = {split: {"imgids": image_ids, "scenes": scenes, "queries": queries}}
    path.write_text(json.dumps({"version": SHAPES_VERSION, "relation_margin": RELATION_MARGIN, "splits": splits}))
    image_shape = np.arange(len(image_ids)) % 3
    return image_shape[np.asarray(text.caption_to_image)][:, None] == image_shape[None, :]


@pytest.mark.ray
def test_relevance_metrics_match_the_dense_reference(tmp_path: Path, trained: dict[str, Path], embedded: Path) -> None:
    store = EmbeddingStore.open(embedded)
    relevance = write_relevance(tmp_path / "relevance.json", store)  # [C, n_images]
    result = evaluate_cli(tmp_path, embedded, trained["model"], "--relevance", str(tmp_path / "relevance.json"))
    assert result.exit_code == 0, result.output
    precision = json.loads((tmp_path / "metrics.json").read_text())["precision"]
    sim = store.attrs["similarity"]
    sims = dense_sims(store["val/image"].embeddings, store["val/text"].embeddings, sim["name"], sim["kwargs"])
    assert precision["t2i_r_precision"] == pytest.approx(r_precision(sims.T, relevance))
    assert precision["t2i_map_at_r"] == pytest.approx(map_at_r(sims.T, relevance))
    assert precision["i2t_r_precision"] == pytest.approx(r_precision(sims, relevance.T))
    assert precision["i2t_map_at_r"] == pytest.approx(map_at_r(sims, relevance.T))
    missing = evaluate_cli(tmp_path, embedded, trained["model"], "--relevance", str(tmp_path / "nope.json"))
    assert missing.exit_code == 1 and 'paths.relevance: ""' in error_line(missing)


@pytest.mark.ray
def test_element_subset_and_similarity_override(tmp_path: Path, trained: dict[str, Path], embedded: Path) -> None:
    assert evaluate_cli(tmp_path, embedded, trained["model"]).exit_code == 0
    full = json.loads((tmp_path / "metrics.json").read_text())
    result = evaluate_cli(tmp_path, embedded, trained["model"], evaluate={"image_elements": [1]})
    assert result.exit_code == 0, result.output
    subset = json.loads((tmp_path / "metrics.json").read_text())
    assert subset["info"]["image_elements"] == "1" and subset["info"]["text_elements"] == "all"
    store = EmbeddingStore.open(embedded)
    image, text = store["val/image"].embeddings, store["val/text"].embeddings
    sim = store.attrs["similarity"]
    expected = recall_at_k(dense_sims(image[:, [1]], text, sim["name"], sim["kwargs"]), CPI)
    assert {k: subset["full"][k] for k in expected} == pytest.approx(expected)
    assert expected != recall_at_k(dense_sims(image, text, sim["name"], sim["kwargs"]), CPI)
    # the circular variance is of the full sets, whatever subset is scored
    assert subset["circular_variance"] == pytest.approx(full["circular_variance"])

    override = evaluate_cli(tmp_path, embedded, None, evaluate={"similarity": "max_similarity"})
    assert override.exit_code == 0, override.output
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got["info"]["similarity"] == "max_similarity" and got["info"]["similarity_source"] == "override"
    expected = recall_at_k(dense_sims(image, text, "max_similarity", {}), CPI)
    assert {k: got["full"][k] for k in expected} == pytest.approx(expected)

    bad = evaluate_cli(tmp_path, embedded, trained["model"], evaluate={"similarity": "no_such_similarity"})
    assert bad.exit_code == 2 and "evaluate.similarity" in error_line(bad)
    out_of_range = evaluate_cli(tmp_path, embedded, trained["model"], evaluate={"text_elements": [2]})
    assert out_of_range.exit_code == 2 and "evaluate.text_elements" in error_line(out_of_range)


# --------------------------------------------------------------------------- protocols on a synthetic store (no Ray)
def synthetic_store(path: Path, n_images: int, seed: int = 0, K: int = 3, D: int = 8) -> tuple[Path, torch.Tensor]:
    """Correlated random sets; captions are stored in a shuffled order to exercise the image-major reordering.

    Returns:
        the path and the image-major text sets ``[cpi * n_images, L, D]``.
    """
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n_images, K, D, generator=g)
    c2i = np.repeat(np.arange(n_images), CPI)  # image-major
    text = image[torch.from_numpy(c2i)] + 1.5 * torch.randn(len(c2i), K, D, generator=g)  # [C, L, D]
    perm = np.random.default_rng(seed).permutation(len(c2i))
    writer = EmbeddingStoreWriter(path, attrs={"similarity": {"name": "smooth_chamfer", "kwargs": {"alpha": 8.0}}})
    img_set = writer.require_set("test/image", ids=[f"i{i}" for i in range(n_images)], num_embeddings=K, embed_dim=D)
    img_set.write_all(image)
    txt_set = writer.require_set(
        "test/text", ids=[f"c{c}" for c in perm], num_embeddings=K, embed_dim=D, caption_to_image=c2i[perm]
    )
    txt_set.write_all(text[torch.from_numpy(perm)])
    writer.finalize()
    return path, text


def test_five_fold_protocol_needs_whole_folds(tmp_path: Path) -> None:
    path, _ = synthetic_store(tmp_path / "e.zarr", n_images=10)
    data = tiny_params_dict()
    data["evaluate"].update({"split": "test", "protocol": "five_fold_1k"})
    result = evaluate_cli(tmp_path, path, None, evaluate=data["evaluate"])
    assert result.exit_code == 2 and "five_fold_1k needs a multiple of 1000 images" in error_line(result)
    missing = evaluate_cli(tmp_path, tmp_path / "none.zarr", None)
    assert missing.exit_code == 1 and "dvc repro embed" in error_line(missing)
