"""stages/serve.py and deploy/serve.yaml without a running app: --help, one-line failures, the Serve config schema."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from stages.serve import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


def test_help_exits_zero_and_names_the_safety_options() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--token", "--shards", "--replicas", "--max-upload-bytes", "--index", "--model"):
        assert option in result.stdout


def test_missing_index_fails_with_one_line_before_starting_ray(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0}))
    result = runner.invoke(app, ["--params", str(params), "--index", str(tmp_path / "none"), "--quiet"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dvc repro index" in errors[0]


def test_bad_option_exits_2(tmp_path: Path) -> None:
    assert runner.invoke(app, ["--port", "0"]).exit_code == 2
    assert runner.invoke(app, ["--shards", "0"]).exit_code == 2


def test_serve_config_file_is_a_valid_serve_deploy_config_for_this_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipeline.serve_api import ServeSettings
    from pipeline.serve_app import build_app, shard_name

    config = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "127.0.0.1"
    (application,) = schema.applications
    module, attr = application.import_path.split(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    settings = ServeSettings(**application.args)  # extra keys would fail here
    expected = {"SearchIngress"} | {shard_name(db, s) for db in ("image", "text") for s in range(settings.shards)}
    assert {d.name for d in application.deployments} == expected
    assert settings.token is None  # the token never lives in the file
