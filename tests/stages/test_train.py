"""stages/train.py: CLI wiring, exit codes, the resume rule as the CLI sees it, model export and dvclive files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from typer.testing import CliRunner

from setemb.feature_store import FeatureStoreWriter
from stages.embed import app as embed_app
from stages.evaluate import app as evaluate_app
from stages.train import app as train_app

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

runner = CliRunner()
CPI, D_IMG, D_TXT, N_REG, T_MAX = 2, 8, 6, 4, 4


def write_store(path: Path, sizes=(("train", 16), ("val", 8)), seed: int = 0, finalize: bool = True) -> Path:
    """A learnable feature store: each caption's tokens are a noisy linear map of its image's mean region feature."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D_IMG, D_TXT))
    writer = FeatureStoreWriter(path, attrs={"dataset": "synthetic"})
    for split, n in sizes:
        img_local = rng.normal(size=(n, N_REG, D_IMG)).astype(np.float32)  # [n, N, D_img]
        c2i = np.repeat(np.arange(n), CPI)  # [C]
        lengths = rng.integers(2, T_MAX + 1, size=len(c2i))
        txt_local = np.zeros((len(c2i), T_MAX, D_TXT), np.float32)  # [C, T, D_txt]
        for c, (i, k) in enumerate(zip(c2i, lengths, strict=True)):
            txt_local[c, :k] = img_local[i].mean(0) @ W + 0.1 * rng.normal(size=(k, D_TXT))
        image = writer.require_modality(
            split, "image", n=n, backbone="toy", local_dim=D_IMG, global_dim=D_IMG, max_tokens=N_REG, unit_size=8
        )
        text = writer.require_modality(
            split, "text", n=len(c2i), backbone="toy", local_dim=D_TXT, global_dim=None, max_tokens=T_MAX, unit_size=8
        )
        for u in range(image.num_units):
            lo, hi = image.unit_items(u)
            image.write_unit(u, img_local[lo:hi], img_local[lo:hi].mean(1), [f"{split}-i{j}" for j in range(lo, hi)])
        for u in range(text.num_units):
            lo, hi = text.unit_items(u)
            ids = [f"{split}-c{j}" for j in range(lo, hi)]
            text.write_unit(u, txt_local[lo:hi], None, ids, lengths=lengths[lo:hi], caption_to_image=c2i[lo:hi])
    if finalize:
        writer.finalize()
    return path


def tiny_params_dict(**train) -> dict:
    return {
        "seed": 0,
        "extract": {"captions_per_image": CPI},
        "train": {
            "images_per_batch": 4,
            "model": {"embed_dim": 16, "num_embeddings": 2, "head": "slot"},
            "loss": {"name": "triplet", "kwargs": {"similarity": "smooth_chamfer", "margin": 0.2}},
            "optim": {"lr": 0.003, "epochs": 2, "warmup_epochs": 0.5, "amp": False},
            "ray": {"num_workers": 0, "max_failures": 0},
            "eval_block_size": 16,
            **train,
        },
        "embed": {"splits": ["val"], "batch_size": 3},
        "evaluate": {"split": "val", "block_size": 3, "recall_ks": [1, 2, 5]},
    }


def write_params(path: Path, data: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(data or tiny_params_dict()))
    return path


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("features") / "features.zarr")


def train_cli(tmp_path: Path, features: Path, *extra: str, params: Path | None = None):
    params = params or write_params(tmp_path / "params.yaml")
    args = ["--params", str(params), "--features", str(features), "--storage", str(tmp_path / "training")]
    return runner.invoke(
        train_app, [*args, "--out", str(tmp_path / "model"), "--live", str(tmp_path / "dvclive"), "--quiet", *extra]
    )


# --------------------------------------------------------------------------------------------------- no training
@pytest.mark.parametrize("app", [train_app, embed_app, evaluate_app], ids=["train", "embed", "evaluate"])
def test_help_exits_zero(app) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--params" in result.stdout and "--debug" in result.stdout


def test_missing_store_exits_1_with_the_extract_hint(tmp_path: Path) -> None:
    result = train_cli(tmp_path, tmp_path / "nowhere.zarr")
    assert result.exit_code == 1 and "dvc repro extract" in error_line(result)


def test_incomplete_store_exits_1(tmp_path: Path) -> None:
    path = write_store(tmp_path / "partial.zarr", finalize=False)
    result = train_cli(tmp_path, path)
    assert result.exit_code == 1 and "incomplete" in error_line(result) and "extract" in error_line(result)


def test_invalid_params_and_overrides_exit_2(tmp_path: Path, store: Path) -> None:
    bad = tiny_params_dict(optim={"lr": -1.0})
    result = train_cli(tmp_path, store, params=write_params(tmp_path / "bad.yaml", bad))
    assert result.exit_code == 2 and "train.optim.lr" in result.stderr
    assert train_cli(tmp_path, store, "--workers", "-1").exit_code == 2
    assert train_cli(tmp_path, store, "--epochs", "0").exit_code == 2
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------------------ local-mode training
@pytest.mark.ray
def test_train_writes_model_and_dvclive_then_resumes_without_retraining(tmp_path: Path, store: Path) -> None:
    result = train_cli(tmp_path, store, "--epochs", "2", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "trained 2 epochs" in result.stdout and "best epoch" in result.stdout
    model = tmp_path / "model"
    assert {p.name for p in model.iterdir()} == {"model.pt", "loss.pt", "config.json"}
    config = json.loads((model / "config.json").read_text())
    assert config["similarity"]["name"] == "smooth_chamfer" and config["epoch"] in (0, 1)
    live = tmp_path / "dvclive"
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 1 and "train_loss" in summary and "val_rsum" in summary
    loss_rows = (live / "plots" / "metrics" / "train_loss.tsv").read_text().strip().splitlines()
    assert loss_rows[0].split("\t") == ["step", "train_loss"] and len(loss_rows) == 3
    assert float(loss_rows[2].split("\t")[1]) < float(loss_rows[1].split("\t")[1])
    runs = list((tmp_path / "training").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("train-")

    # DVC deletes non-persisted outs before a rerun; the persisted storage resumes the finished run and restores them
    shutil.rmtree(model)
    shutil.rmtree(live)
    again = train_cli(tmp_path, store, "--epochs", "2", "--workers", "0")
    assert again.exit_code == 0, again.output
    assert "trained 2 epochs" in again.stdout and "resumed" in again.stdout
    assert json.loads((model / "config.json").read_text()) == config
    assert json.loads((live / "metrics.json").read_text()) == summary
    assert len((live / "plots" / "metrics" / "train_loss.tsv").read_text().strip().splitlines()) == 3


@pytest.mark.ray
def test_nonfinite_loss_exits_1_naming_the_step(tmp_path: Path) -> None:
    path = write_store(tmp_path / "nan.zarr")
    local = zarr.open_group(str(path), mode="r+", use_consolidated=False)["train/image/local"]
    local[:] = np.full(local.shape, np.nan, dtype=local.dtype)
    result = train_cli(tmp_path, path, "--epochs", "1")
    assert result.exit_code == 1
    assert "non-finite loss at epoch 0 step 0" in error_line(result)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_nonfinite_loss_on_ray_workers_exits_1_naming_the_step(tmp_path: Path) -> None:
    """The same failure through two Ray Train workers (DDP), where Ray wraps the worker's exception."""
    path = write_store(tmp_path / "nan.zarr")
    local = zarr.open_group(str(path), mode="r+", use_consolidated=False)["train/image/local"]
    local[:] = np.full(local.shape, np.nan, dtype=local.dtype)
    result = train_cli(tmp_path, path, "--epochs", "1", "--workers", "2")
    assert result.exit_code == 1, result.output
    assert "non-finite loss at epoch 0 step 0" in error_line(result)
