"""Compressed indexes (index.kind ivf_sq8 / ivf_pq) through stages.index, stages.search and the stages.serve checks.

Uses the session's tiny search world (``built``: 6 test images, 12 captions, K = 2, D = 16). On a database this small
every IVF cell is probed, every element is a candidate and every set is re-ranked, so a compressed index must give
exactly the brute-force ranking: the codes only pick candidates, the scores come from the embedding store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from typer.testing import CliRunner

from pipeline.cli import StageError
from pipeline.indexing import MANIFEST_JSON, load_database_index, run_index
from pipeline.params import Params
from pipeline.search import run_search
from setemb.index.compressed import CompressedSetIndex
from stages.index import app as index_app
from stages.serve import app as serve_app
from tests.stages.test_search import CPI, N_TEST, QUERY, brute_force, error_line, params_dict, search_cli, write_params

runner = CliRunner()
PQ = {"pq_m": 4, "pq_bits": 3}  # 4 sub-vectors of 4 dims, 8 centroids each: trainable on the 12 image elements


def _index_cli(built: dict, params_file: Path, out: Path, embeddings: Path | None = None):
    root = built["root"]
    args = ["--params", str(params_file), "--embeddings", str(embeddings or root / "emb.zarr"),
            "--model", str(root / "model"), "--out", str(out), "--quiet"]  # fmt: skip
    return runner.invoke(index_app, args)


@pytest.mark.parametrize("kind", ["ivf_sq8", "ivf_pq"])
def test_compressed_index_round_trip_gives_the_exact_ranking(built: dict, tmp_path: Path, kind: str) -> None:
    root = built["root"]
    params_file = write_params(tmp_path / "params.yaml", params_dict(root, kind=kind, **PQ))
    out = tmp_path / "ix"
    result = _index_cli(built, params_file, out)
    assert result.exit_code == 0, result.output
    assert f"test/image: {N_TEST} sets x 2 of width 16 ({kind}, " in result.stdout and "MiB resident" in result.stdout

    manifest = json.loads((out / MANIFEST_JSON).read_text())
    for modality, n in (("image", N_TEST), ("text", N_TEST * CPI)):
        entry = manifest["indexes"][modality]
        assert (entry["kind"], entry["items"]) == (kind, n)
        # the store is referenced (relative to the sub-index), not copied: codes + config only
        assert sorted(os.listdir(out / modality)) == ["config.json", "index.faiss"]
        assert not Path(entry["store"]).is_absolute()
        assert (out / modality / entry["store"]).resolve() == (root / "emb.zarr" / "test" / modality).resolve()
        loaded = load_database_index(out / modality)
        assert isinstance(loaded, CompressedSetIndex) and len(loaded) == n and loaded.config["kind"] == kind
        assert entry["resident_bytes"]["codes"] == n * 2 * loaded.faiss_index.code_size
        assert loaded.config["similarity"] == manifest["similarity"]["name"]

    text = search_cli(built, QUERY, "--json", "--k", str(N_TEST), index=out)  # the CLI, as a user runs it
    assert text.exit_code == 0, text.output
    rows = json.loads(text.stdout)["results"]
    ids, scores = brute_force(built, built["encoder"].encode_text([QUERY]), "image", N_TEST)
    assert [r["id"] for r in rows] == ids
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows]), scores, atol=1e-5, rtol=1e-5)

    params = Params.model_validate(params_dict(root, kind=kind, **PQ))
    image = built["split"].image_paths[1]
    answer = run_search(params, image=image, k=N_TEST * CPI, index=out, encoder=built["encoder"])
    ids, scores = brute_force(built, built["encoder"].encode_images([image]), "text", N_TEST * CPI)
    assert [r["id"] for r in answer.results] == ids
    torch.testing.assert_close(torch.tensor([r["score"] for r in answer.results]), scores, atol=1e-5, rtol=1e-5)


def test_a_missing_or_changed_embedding_store_is_one_line_with_the_fix(built: dict, tmp_path: Path) -> None:
    root = built["root"]
    store = tmp_path / "emb.zarr"
    shutil.copytree(root / "emb.zarr", store)
    params = Params.model_validate(params_dict(root, kind="ivf_sq8"))
    run_index(params, embeddings=store, model=root / "model", out=tmp_path / "ix")
    ok = run_search(params, query=QUERY, k=3, index=tmp_path / "ix", encoder=built["encoder"])
    assert len(ok.results) == 3

    images = zarr.open_array(str(store / "test" / "image" / "embeddings"), mode="r+")
    images[:] = images[:][::-1]  # another store at the same path: same shape, rows in another order
    changed = search_cli(built, QUERY, index=tmp_path / "ix")
    line = error_line(changed)
    assert changed.exit_code == 1 and "holds other vectors" in line and "dvc repro index" in line
    with pytest.raises(StageError, match="holds other vectors"):
        load_database_index(tmp_path / "ix" / "image")

    shutil.rmtree(store)
    missing = search_cli(built, QUERY, index=tmp_path / "ix")
    line = error_line(missing)
    assert missing.exit_code == 1 and "which is missing" in line and "dvc repro embed" in line
    assert str(store / "test" / "image") in line

    served = runner.invoke(serve_app, ["--params", str(built["params_file"]), "--index", str(tmp_path / "ix"),
                                       "--model", str(root / "model"), "--quiet"])  # fmt: skip
    assert served.exit_code == 1 and "which is missing" in error_line(served)  # before Ray starts


def test_compressed_params_the_database_cannot_take_fail_before_writing(built: dict, tmp_path: Path) -> None:
    root = built["root"]
    too_many_bits = write_params(tmp_path / "bits.yaml", params_dict(root, kind="ivf_pq", pq_m=4, pq_bits=8))
    result = _index_cli(built, too_many_bits, tmp_path / "ix")
    line = error_line(result)
    assert result.exit_code == 1 and "index.pq_bits=8 trains 256 centroids" in line and "has only 12 elements" in line

    wider = params_dict(root, kind="ivf_pq", pq_m=32)
    wider["train"]["model"]["embed_dim"] = 32  # params say D = 32, the store holds D = 16 (made by another params)
    result = _index_cli(built, write_params(tmp_path / "m.yaml", wider), tmp_path / "ix")
    assert result.exit_code == 1 and "index.pq_m=32 does not divide the embedding width D=16" in error_line(result)
    assert not (tmp_path / "ix").exists() and not list(tmp_path.glob(".ix.*"))
