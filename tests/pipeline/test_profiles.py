"""pipeline/profiles.py and profiles/*.yaml: every profile validates over params.yaml, the `-S` flags round-trip
through DVC's own override code, `apply_profile` keeps comments, and each compared system trains and evaluates end to
end on a tiny extracted shapes dataset (shared with the study tests)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.params import Params, ParamsError, load_params
from pipeline.profiles import (
    SYSTEM_PROFILES,
    apply_profile,
    dvc_set_args,
    hydra_value,
    list_profiles,
    load_profile,
    merge_overlay,
    profile_params,
)

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
TINY_SIZES = {"train_images": 12, "val_images": 4, "test_images": 4, "image_size": 64}


# ---------------------------------------------------------------------------------------------- tiny shared data
def tiny_params_dict(root: Path) -> dict:
    """A tiny DivE config over the tiny dataset in ``root`` (D = 16, K = 2, T = 2, 2 batches, local mode)."""
    shapes = root / "shapes"
    return {
        "seed": 0,
        "paths": {
            "shapes": str(shapes),
            "dataset_json": str(shapes / "dataset.json"),
            "image_root": str(shapes / "images"),
            "relevance": str(shapes / "relevance.json"),
            "features": str(root / "features.zarr"),
        },
        "extract": {"workers": 1, "batch_size": 8, "items_per_unit": 8},
        "train": {
            "images_per_batch": 4,
            "model": {
                "embed_dim": 16,
                "num_embeddings": 2,
                "head": "slot",
                "head_kwargs": {"num_iterations": 2, "attention_dim": 16, "mlp_ratio": 2, "dropout": 0.1},
                "image_head_kwargs": {"positional_encoding": "sine2d"},
            },
            "loss": {
                "name": "triplet",
                "kwargs": {
                    "similarity": "smooth_chamfer",
                    "similarity_kwargs": {"alpha": 16.0},
                    "margin": 0.1,
                    "diversity": "dive",
                    "diversity_weight": 0.1,
                    "mmd_weight": 0.01,
                },
            },
            "optim": {"lr": 0.003, "epochs": 1, "warmup_epochs": 0.0, "amp": False},
            "ray": {"num_workers": 0, "max_failures": 0},
            "limit_batches": 2,
            "eval_block_size": 8,
        },
        "embed": {"splits": ["test"], "batch_size": 8, "save_attention": False},
        "evaluate": {"split": "test", "block_size": 8, "recall_ks": [1, 5, 10]},
    }


def tiny_dataset(root: Path) -> Path:
    """Generate the tiny shapes dataset and extract its features with the real small backbones, once per session
    (both steps are no-ops when ``root`` already holds them); returns the params.yaml written there."""
    from pipeline.feature_cache import run_extract
    from pipeline.shapes import generate_shapes

    data = tiny_params_dict(root)
    generate_shapes(root / "shapes", seed=0, **TINY_SIZES)
    params = Params.model_validate(data)
    run_extract(
        params.extract,
        Path(data["paths"]["features"]),
        dataset_json=Path(data["paths"]["dataset_json"]),
        image_root=Path(data["paths"]["image_root"]),
    )
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.getbasetemp() / "tiny_study_data")


# ------------------------------------------------------------------------------------------------- validation
def test_the_profile_set_is_complete() -> None:
    names = set(list_profiles())
    assert set(SYSTEM_PROFILES) <= names
    assert {"paper_coco_resnet152", "paper_coco_resnext101_bert", "paper_coco_butd_roi"} <= names


@pytest.mark.parametrize("name", list_profiles())
def test_every_profile_validates_over_params_yaml(name: str) -> None:
    params = profile_params(name, PARAMS)
    overlay = load_profile(name)
    if "model" in overlay.get("train", {}):  # what the profile sets is what the merged params hold
        for key in ("head", "num_embeddings", "embed_dim"):
            if key in overlay["train"]["model"]:
                assert getattr(params.train.model, key) == overlay["train"]["model"][key]
    if params.train.model.head in ("probabilistic", "single_vector"):
        assert params.train.model.num_embeddings == 1


def test_system_profiles_differ_where_the_systems_differ() -> None:
    got = {name: profile_params(name, PARAMS).train for name in SYSTEM_PROFILES}
    assert got["dive"] == load_params(PARAMS).train  # the default is DivE
    assert (got["pvse"].model.head, got["pvse"].loss.kwargs["similarity"]) == ("pienet", "max_similarity")
    assert got["pvse"].loss.kwargs["diversity"] == "gram" and "num_iterations" not in got["pvse"].model.head_kwargs
    assert (got["pcme"].model.head, got["pcme"].loss.name) == ("probabilistic", "pcme")
    assert got["maxmatch"].loss.kwargs["similarity"] == "pair_assignment"
    assert got["maxmatch"].loss.kwargs["global_discriminative_weight"] > 0
    assert got["maxmatch"].loss.kwargs["intra_set_divergence_weight"] > 0
    assert got["vsepp"].model.head == "single_vector" and got["vsepp"].loss.kwargs["diversity"] == "none"
    assert "mmd_weight" not in got["vsepp"].loss.kwargs


def test_merge_overlay_merges_replaces_and_keeps_inputs() -> None:
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}, "l": [1, 2]}, "x": 0}
    overlay = {"a": {"c": {"e": 4}, "l": [3], "r": {"_replace": True, "z": 1}}, "y": {"k": 1}}
    before = json.dumps([base, overlay], sort_keys=True)
    merged = merge_overlay(base, overlay)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 4}, "l": [3], "r": {"z": 1}}, "x": 0, "y": {"k": 1}}
    assert merge_overlay(base, {"a": {"c": {"_replace": True, "q": 5}}})["a"]["c"] == {"q": 5}
    assert json.dumps([base, overlay], sort_keys=True) == before


def test_bad_overlays_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text("train:\n  loss:\n    kwargs:\n      kl_weight: 1e-5\n")
    with pytest.raises(ParamsError, match="1.0e-5"):
        load_profile("exp", tmp_path)
    (tmp_path / "top.yaml").write_text("_replace: true\n")
    with pytest.raises(ParamsError, match="_replace"):
        load_profile("top", tmp_path)
    (tmp_path / "typo.yaml").write_text("train:\n  model:\n    hed: slot\n")
    with pytest.raises(ParamsError, match="train.model.hed"):
        profile_params("typo", PARAMS, tmp_path)
    with pytest.raises(ParamsError, match="known: .*top"):
        load_profile("nope", tmp_path)


# ---------------------------------------------------------------------------------------------- args / apply
def _apply_with_dvc(params_file: Path, flags: list[str]) -> None:
    """What `dvc exp run -S ...` does to params.yaml (dvc.repo.experiments calls this function)."""
    from dvc.utils.hydra import apply_overrides

    overrides = [flag for flag in flags if flag != "-S"]
    assert len(overrides) * 2 == len(flags)
    apply_overrides(str(params_file), overrides)


@pytest.mark.parametrize("name", list_profiles())
def test_args_round_trip_through_dvc_overrides(tmp_path: Path, name: str) -> None:
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    flags = dvc_set_args(load_profile(name), load_params(copy).model_dump(mode="json"))
    assert not any(c.isspace() for flag in flags for c in flag)  # safe for unquoted $(...)
    _apply_with_dvc(copy, flags)
    assert load_params(copy) == profile_params(name, PARAMS)
    assert "# Ray Train storage: checkpoints of every run" in copy.read_text()  # DVC keeps the comments


_text = st.text(alphabet=st.sampled_from("ab_Z09.-/:'\"{}[],=\\é$"), max_size=8)
_leaf = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, width=32) | _text
_values = st.recursive(
    _leaf,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,5}", fullmatch=True), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=50, deadline=None)
@given(value=_values)
def test_hydra_value_parses_back_to_the_same_value(value) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "${" in json.dumps(value):  # OmegaConf would resolve it as an interpolation: refused
        with pytest.raises(ValueError, match="interpolation"):
            hydra_value(value)
        return
    override = OverridesParser.create().parse_overrides([f"++key={hydra_value(value)}"])[0]
    assert override.value() == value


def test_apply_keeps_comments_and_other_keys(tmp_path: Path) -> None:
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    original = copy.read_text().splitlines()
    merged = apply_profile("pvse", copy)
    assert merged == profile_params("pvse", PARAMS) == load_params(copy)
    text = copy.read_text().splitlines()
    # every line outside the changed train.model / train.loss blocks is byte-identical, comments included
    unchanged = [
        line
        for line in original
        if "kwargs" not in line and not line.startswith(("      ", "    head")) and "num_embeddings" not in line
    ]
    assert all(line in text for line in unchanged)
    assert (
        "    num_embeddings: 2      # K" in text
        and "      margin: 0.1          # paper: 0.1 conv grids, 0.2 ROI" in text
    )
    assert "    head: pienet           # slot | transformer | pienet | probabilistic | single_vector" in text
    # a new exponent float is written so that PyYAML (load_params) reads a float back
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "kl.yaml").write_text(
        "train:\n  loss:\n    name: pcme\n    kwargs: {_replace: true, kl_weight: 1.0e-6}\n"
        "  model: {num_embeddings: 1, head: probabilistic, head_kwargs: {_replace: true, num_samples: 3},"
        " image_head_kwargs: {_replace: true, dropout: 0.0}, text_head_kwargs: {_replace: true, dropout: 0.0}}\n"
    )
    assert apply_profile("kl", copy, tmp_path / "p").train.loss.kwargs["kl_weight"] == 1e-6


# ------------------------------------------------------------------------------------------- end-to-end systems
@pytest.mark.parametrize("name", SYSTEM_PROFILES)
def test_system_trains_and_evaluates_end_to_end(tmp_path: Path, tiny: Path, name: str) -> None:
    from pipeline.checkpoints import load_model
    from pipeline.embedding import run_embed
    from pipeline.evaluation import run_evaluate
    from pipeline.ray_train import run_training
    from setemb.embedding_store import EmbeddingStore

    params = profile_params(name, tiny)
    paths = params.paths
    result = run_training(params, features=paths.features, storage_path=tmp_path / "training", quiet=True)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train_loss"])
    _, loss_fn, config = load_model(result.best_model)
    assert config["model"]["head"] == params.train.model.head
    run_embed(params, features=paths.features, model=result.best_model, out=tmp_path / "emb.zarr", quiet=True)
    K = 1 if name in ("pcme", "vsepp") else params.train.model.num_embeddings
    J = params.train.model.head_kwargs.get("num_samples", K)  # PCME's set is its J samples
    J = 2 if name == "pcmepp" else J  # PCME++ stores (mu, sigma)
    assert EmbeddingStore.open(tmp_path / "emb.zarr")["test/image"].embeddings.shape == (4, J, 16)
    out = {"metrics": tmp_path / "m.json", "plots": tmp_path / "plots"}
    metrics = run_evaluate(
        params, embeddings=tmp_path / "emb.zarr", model=result.best_model, relevance=paths.relevance, **out
    )
    assert 0.0 <= metrics["full"]["rsum"] <= 600.0 and metrics["full"]["t2i_r5"] == 100.0  # 4 images: all in top 5
    assert set(metrics["precision"]) >= {"t2i_r_precision", "t2i_map_at_r"}
    expected = {"pcme": "match_probability", "maxmatch": "pair_assignment", "pvse": "max_similarity", "pcmepp": "csd"}
    assert metrics["info"]["similarity"] == expected.get(name, params.train.loss.kwargs.get("similarity"))
    if name == "pcme":  # evaluated with the learnt scale / shift of the loss, not the neutral defaults
        assert json.loads(metrics["info"]["similarity_kwargs"]) == loss_fn.similarity_kwargs()
