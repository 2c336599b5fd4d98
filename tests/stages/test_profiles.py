"""stages/profile.py: the Typer commands `list`, `show` and `args` (exit codes, stdout, one-line errors)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from pipeline.params import Params, load_params
from pipeline.profiles import PROFILES_DIR, dvc_set_args, list_profiles, load_profile, profile_params
from stages.profile import app

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
runner = CliRunner()


def test_args_cli_prints_the_flags_and_refuses_what_dvc_cannot_write(tmp_path: Path) -> None:
    result = runner.invoke(app, ["args", "pvse", "--params", str(PARAMS)])
    assert result.exit_code == 0, result.output
    base = load_params(PARAMS).model_dump(mode="json")
    assert result.stdout.split() == dvc_set_args(load_profile("pvse"), base)
    assert "-S ++train.model.head=pienet" in result.stdout and "++train.loss.kwargs=null" in result.stdout
    # emptying the commented, non-empty image_head_kwargs corrupts params.yaml inside DVC: refused, exit 2
    (tmp_path / "empty.yaml").write_text("train:\n  model:\n    image_head_kwargs: {_replace: true}\n")
    refused = runner.invoke(app, ["args", "empty", "--params", str(PARAMS), "--profiles-dir", str(tmp_path)])
    assert refused.exit_code == 2 and "train.model.image_head_kwargs" in refused.stderr
    unknown = runner.invoke(app, ["args", "nope", "--params", str(PARAMS)])
    assert unknown.exit_code == 2 and "known: " in unknown.stderr


def test_list_and_show_cli() -> None:
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and all(name in listed.stdout for name in list_profiles())
    shown = runner.invoke(app, ["show", "vsepp"])
    assert shown.exit_code == 0 and shown.stdout == (PROFILES_DIR / "vsepp.yaml").read_text()
    merged = runner.invoke(app, ["show", "vsepp", "--merged", "--params", str(PARAMS)])
    assert merged.exit_code == 0
    assert Params.model_validate(yaml.safe_load(merged.stdout)) == profile_params("vsepp", PARAMS)
