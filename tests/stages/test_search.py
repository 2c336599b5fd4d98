"""stages/index.py, stages/search.py and pipeline/query.py, end to end on a tiny trained model.

One module fixture runs the real chain on a tiny shapes dataset: extract (efficientnet_lite0 + MiniLM, the packaged
offline weights) -> one short epoch of Ray-local training -> embed -> index. Searches are then checked against a
brute-force ``setemb.similarity.score`` top-k over the same database, and the query encoder against the stored sets.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.embedding import run_embed
from pipeline.feature_cache import run_extract
from pipeline.indexing import ITEMS_JSON, MANIFEST_JSON, run_index
from pipeline.params import load_params
from pipeline.query import QueryEncoder
from pipeline.ray_train import run_training
from pipeline.shapes import generate_shapes
from setemb.data import read_karpathy
from setemb.embedding_store import EmbeddingStore
from setemb.index import SetIndex
from setemb.similarity import score
from stages.index import app as index_app
from stages.search import app as search_app

runner = CliRunner()
CPI, N_TEST, K, D, TOP = 2, 6, 2, 16, 3
QUERY = "a red circle to the left of a blue square"


def params_dict(root: Path, **index) -> dict:
    return {
        "seed": 0,
        "paths": {"index": str(root / "index"), "model": str(root / "model")},
        "extract": {
            "splits": ["train", "test"],
            "captions_per_image": CPI,
            "batch_size": 8,
            "items_per_unit": 8,
            "workers": 1,
        },
        "train": {
            "images_per_batch": 4,
            "model": {"embed_dim": D, "num_embeddings": K, "head": "slot"},
            "loss": {"name": "triplet", "kwargs": {"similarity": "smooth_chamfer", "margin": 0.2}},
            "optim": {"lr": 0.003, "epochs": 1, "amp": False},
            "ray": {"num_workers": 0, "max_failures": 0},
            "limit_batches": 2,
        },
        "embed": {"splits": ["test"], "batch_size": 4},
        "index": {"split": "test", "storage_dtype": "float32", "top_k": TOP, **index},
    }


def write_params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def build_search_world(root: Path) -> dict:
    """shapes -> features -> model (1 short epoch, local mode) -> embeddings -> index (via the CLI), under ``root``.

    The session fixture ``built`` (tests/conftest.py) builds it once for this module and tests/pipeline/test_search.py.
    """
    data = generate_shapes(root / "shapes", seed=0, train_images=8, val_images=1, test_images=N_TEST, image_size=64)
    params_file = write_params(root / "params.yaml", params_dict(root))
    params = load_params(params_file)
    dataset_json, image_root = data / "dataset.json", data / "images"
    run_extract(params.extract, root / "features.zarr", dataset_json=dataset_json, image_root=image_root)
    run_training(params, features=root / "features.zarr", storage_path=root / "training", model_dir=root / "model",
                 quiet=True)  # fmt: skip
    run_embed(params, features=root / "features.zarr", model=root / "model", out=root / "emb.zarr", quiet=True)
    args = ["--params", str(params_file), "--embeddings", str(root / "emb.zarr"), "--model", str(root / "model")]
    paths = ["--dataset-json", str(dataset_json), "--image-root", str(image_root)]
    result = runner.invoke(index_app, [*args, *paths, "--out", str(root / "index"), "--quiet"])
    assert result.exit_code == 0, result.output
    return {
        "root": root,
        "params_file": params_file,
        "params": params,
        "split": read_karpathy(dataset_json, image_root, "test", CPI),
        "store": EmbeddingStore.open(root / "emb.zarr"),
        "encoder": QueryEncoder(root / "model", params),
    }


def search_cli(built: dict, *args: str, index: Path | None = None, model: Path | None = None):
    root = built["root"]
    paths = ["--index", str(index or root / "index"), "--model", str(model or root / "model")]
    return runner.invoke(search_app, [*args, *paths, "--params", str(built["params_file"]), "--quiet"])


def brute_force(built: dict, query_set: torch.Tensor, modality: str, k: int) -> tuple[list[str], torch.Tensor]:
    """Top-k ids and scores of the full similarity matrix over the stored ``test/<modality>`` sets."""
    store = built["store"]
    database = store[f"test/{modality}"]
    similarity = store.attrs["similarity"]
    scores, rows = score(query_set, database.embeddings, similarity["name"], topk=k, **similarity["kwargs"])
    return [database.ids[r] for r in rows[0].tolist()], scores[0]


# ---------------------------------------------------------------------------------------------------- no data
@pytest.mark.parametrize("app", [index_app, search_app], ids=["index", "search"])
def test_help_exits_zero(app) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--params" in result.stdout and "--model" in result.stdout


def test_empty_and_ambiguous_queries_exit_2_without_data(tmp_path: Path) -> None:
    for args in ([], [""], ["   "], ["a cat", "--image", "x.jpg"], ["a cat", "--k", "0"]):
        result = runner.invoke(search_app, [*args, "--params", str(tmp_path / "none.yaml")])
        assert result.exit_code == 2, args
        assert error_line(result).startswith("error: "), args


# ------------------------------------------------------------------------------------------------------ index
def test_index_writes_manifest_items_and_both_databases(built: dict) -> None:
    index_dir = built["root"] / "index"
    manifest = json.loads((index_dir / MANIFEST_JSON).read_text())
    store, split = built["store"], built["split"]
    assert manifest["split"] == "test" and manifest["similarity"] == store.attrs["similarity"]
    assert manifest["indexes"] == {
        "image": {"items": N_TEST, "set_size": K, "embed_dim": D, "kind": "flat"},
        "text": {"items": N_TEST * CPI, "set_size": K, "embed_dim": D, "kind": "flat"},
    }
    items = json.loads((index_dir / ITEMS_JSON).read_text())
    assert [i["id"] for i in items["images"]] == store["test/image"].ids == split.image_ids
    assert [i["path"] for i in items["images"]] == [str(p) for p in split.image_paths]
    assert [c["text"] for c in items["captions"]] == split.captions
    assert [c["image"] for c in items["captions"]] == [split.image_ids[i] for i in split.caption_to_image]
    for modality, n in (("image", N_TEST), ("text", N_TEST * CPI)):
        index = SetIndex.load(index_dir / modality)
        assert len(index) == n and index.config["similarity"] == manifest["similarity"]["name"]
        torch.testing.assert_close(
            torch.from_numpy(index.vectors.gather(np.arange(n))), store[f"test/{modality}"].embeddings
        )
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".index")]  # no staging left behind


def test_index_errors_name_the_stage_to_run(built: dict, tmp_path: Path) -> None:
    root = built["root"]
    other = write_params(tmp_path / "p.yaml", params_dict(root, split="train"))
    args = ["--embeddings", str(root / "emb.zarr"), "--model", str(root / "model"), "--out", str(tmp_path / "ix")]
    result = runner.invoke(index_app, ["--params", str(other), *args])
    assert result.exit_code == 1 and "dvc repro embed" in error_line(result)
    args[1] = str(tmp_path / "nowhere.zarr")
    result = runner.invoke(index_app, ["--params", str(built["params_file"]), *args])
    assert result.exit_code == 1 and "dvc repro embed" in error_line(result)
    assert not (tmp_path / "ix").exists()


# --------------------------------------------------------------------------------------------------- encoding
def test_query_encoder_reproduces_the_stored_sets(built: dict) -> None:
    """Queries taken from the test split land on their stored sets (same backbone, dtype rounding and tower)."""
    encoder, store, split = built["encoder"], built["store"], built["split"]
    text = encoder.encode_text(split.captions)  # [C, L, D]
    images = encoder.encode_images(split.image_paths)  # [N, K, D]
    assert text.shape == (N_TEST * CPI, K, D) and images.shape == (N_TEST, K, D)
    torch.testing.assert_close(text, store["test/text"].embeddings)  # float32 defaults: batch-size noise only
    torch.testing.assert_close(images, store["test/image"].embeddings)
    assert encoder.similarity == store.attrs["similarity"]


def test_image_queries_use_the_transform_the_model_was_trained_on(built: dict) -> None:
    """params naming the other extract.image_transform do not change what an image query sees: the backbone takes
    the transform recorded in the model's feature summary, so stored images still land on their stored sets."""
    params, split = built["params"], built["split"]
    trained = params.extract.image_transform
    other = "center_crop" if trained == "resize" else "resize"
    flipped = params.model_copy(update={"extract": params.extract.model_copy(update={"image_transform": other})})
    encoder = QueryEncoder(built["root"] / "model", flipped)
    assert encoder.config["features"]["image"]["image_transform"] == trained
    assert encoder.visual_backbone.image_transform == trained
    torch.testing.assert_close(encoder.encode_images(split.image_paths), built["store"]["test/image"].embeddings)
    assert encoder.image_transform({"backbone": "efficientnet_lite0"}) == "center_crop"  # a model from before


# ----------------------------------------------------------------------------------------------------- search
def test_text_query_prints_k_ranked_images(built: dict) -> None:
    as_json = search_cli(built, QUERY, "--json")
    assert as_json.exit_code == 0, as_json.output
    answer = json.loads(as_json.stdout)
    rows = answer["results"]
    assert answer["direction"] == "text_to_image" and answer["query"] == QUERY and answer["split"] == "test"
    assert [r["rank"] for r in rows] == list(range(1, TOP + 1))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    ids, brute = brute_force(built, built["encoder"].encode_text([QUERY]), "image", TOP)
    assert [r["id"] for r in rows] == ids
    torch.testing.assert_close(torch.tensor(scores), brute, atol=1e-5, rtol=1e-5)
    paths = {i: str(p) for i, p in zip(built["split"].image_ids, built["split"].image_paths, strict=True)}
    assert [r["path"] for r in rows] == [paths[i] for i in ids]

    table = search_cli(built, QUERY, "--k", "2")
    assert table.exit_code == 0, table.output
    assert "rank" in table.stdout and "score" in table.stdout and "text to image" in table.stdout
    lines = re.findall(r"^│\s*(\d+)\s*│\s*(\S+)\s*│\s*(\S+)\s*│\s*(\S+)\s*│$", table.stdout, re.MULTILINE)
    assert [(rank, i, score) for rank, i, _, score in lines] == [
        (str(r["rank"]), r["id"], f"{r['score']:.4f}") for r in rows[:2]
    ]
    assert all(r["path"].startswith(shown) for r, (_, _, shown, _) in zip(rows, lines, strict=False))  # long: folded


def test_image_query_returns_captions(built: dict) -> None:
    image = built["split"].image_paths[0]
    result = search_cli(built, "--image", str(image), "--json", "--k", "4")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["direction"] == "image_to_text" and len(answer["results"]) == 4
    ids, brute = brute_force(built, built["encoder"].encode_images([image]), "text", 4)
    assert [r["id"] for r in answer["results"]] == ids
    torch.testing.assert_close(torch.tensor([r["score"] for r in answer["results"]]), brute, atol=1e-5, rtol=1e-5)
    split = built["split"]
    caption_of = dict(zip(split.caption_ids, split.captions, strict=True))
    for row in answer["results"]:
        assert row["caption"] == caption_of[row["id"]] and row["image"] in split.image_ids


def test_search_errors_are_one_line_with_the_fix(built: dict, tmp_path: Path) -> None:
    missing_index = search_cli(built, QUERY, index=tmp_path / "no-index")
    assert missing_index.exit_code == 1 and "dvc repro index" in error_line(missing_index)

    missing_model = search_cli(built, QUERY, model=tmp_path / "no-model")
    assert missing_model.exit_code == 1 and "dvc repro train" in error_line(missing_model)

    other = tmp_path / "other-model"
    shutil.copytree(built["root"] / "model", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "note": "retrained"}))
    mismatch = search_cli(built, QUERY, model=other)
    assert mismatch.exit_code == 1 and "dvc repro index" in error_line(mismatch)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad_image = search_cli(built, "--image", str(broken))
    assert bad_image.exit_code == 1 and "cannot decode image" in error_line(bad_image)
    assert str(broken) in error_line(bad_image)

    only_images = tmp_path / "ix"
    run_index(built["params"], embeddings=built["root"] / "emb.zarr", model=built["root"] / "model",
              out=only_images, modalities=["image"])  # fmt: skip
    no_text = search_cli(built, "--image", str(built["split"].image_paths[0]), index=only_images)
    assert no_text.exit_code == 1 and "no text index" in error_line(no_text)
