"""params.yaml validates against the one schema; bad input fails naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_committed_params_yaml_validates() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)


def test_committed_params_yaml_is_complete() -> None:
    """Every schema key is written out in params.yaml, so `dvc params diff` shows every hyper-parameter."""

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and not k.endswith("kwargs"):
                out |= keys(v, prefix + k + ".")
        return out

    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert keys(Params().model_dump()) <= keys(committed)


def test_misspelled_key_names_its_dotted_path(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"train\.optim\.learning_rate: Extra inputs are not permitted"):
        load_params(_write(tmp_path, {"train": {"optim": {"learning_rate": 0.1}}}))


def test_wrong_type_names_its_dotted_path_and_value(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"train\.optim\.lr: .*greater than 0.*got -1"):
        load_params(_write(tmp_path, {"train": {"optim": {"lr": -1}}}))
    with pytest.raises(ParamsError, match=r"train\.model\.head: Input should be 'slot'"):
        load_params(_write(tmp_path, {"train": {"model": {"head": "gru"}}}))


def test_bad_image_transform_names_the_key_and_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"extract\.image_transform: Input should be 'resize' or 'center_crop'.*crop"):
        load_params(_write(tmp_path, {"extract": {"image_transform": "crop"}}))


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="no params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_precomputed_backbone_requires_precomp_source(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="extract.source"):
        load_params(_write(tmp_path, {"extract": {"image_backbone": "precomputed"}}))


def test_params_are_frozen() -> None:
    params = Params()
    with pytest.raises(Exception, match="frozen"):
        params.train.optim.lr = 1.0  # type: ignore[misc]


def test_exponent_floats_read_as_floats(tmp_path: Path) -> None:
    """`dvc exp run -S` writes small floats as `1e-05`, which plain YAML 1.1 would read as a string."""
    params = load_params(_write_text(tmp_path, "train:\n  optim: {lr: 1e-05}\n  loss: {kwargs: {kl_weight: 1e-5}}\n"))
    assert params.train.optim.lr == 1e-05
    assert params.train.loss.kwargs["kl_weight"] == 1e-05 and isinstance(params.train.loss.kwargs["kl_weight"], float)
    assert load_params(_write_text(tmp_path, "seed: 7\n")).seed == 7  # integers stay integers


def _write_text(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p
