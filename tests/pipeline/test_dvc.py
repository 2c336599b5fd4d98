"""dvc.yaml stays in step with the code: every params group a stage reads is declared, every dep exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC_YAML["stages"]
# Modules whose params reads count for a stage, beyond stages/<name>.py itself.
EXTRA_MODULES = {
    "index": ["pipeline/indexing.py"],
    "prepare": ["pipeline/shapes.py"],
    "report": ["pipeline/reporting.py", "pipeline/report.py"],
    "train": ["pipeline/training.py", "pipeline/ray_train.py"],
    "embed": ["pipeline/embedding.py"],
    "evaluate": ["pipeline/evaluation.py"],
    "extract": ["pipeline/feature_cache.py", "pipeline/extraction.py"],
}


def _interpolate(text: str) -> str:
    def lookup(match: re.Match) -> str:
        node = PARAMS
        for part in match.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", lookup, text)


def _params_groups_read(stage: str) -> set[str]:
    groups: set[str] = set()
    for rel in [f"stages/{stage}.py", *EXTRA_MODULES.get(stage, [])]:
        source = (ROOT / rel).read_text()
        groups |= set(re.findall(r"\bparams\.(\w+)", source))
    return groups - {"model_dump", "model_dump_json", "paths", "yaml"}  # paths arrive as CLI options from dvc.yaml


def _declared(stage: str) -> set[str]:
    declared = set()
    for entry in STAGES[stage].get("params", []):
        declared.add(entry.split(".")[0] if isinstance(entry, str) else next(iter(entry)))
    return declared


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_every_params_group_it_reads(stage: str) -> None:
    missing = _params_groups_read(stage) - _declared(stage)
    assert not missing, f"dvc.yaml stage {stage!r} reads params {sorted(missing)} but does not list them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_code_deps_exist(stage: str) -> None:
    for dep in STAGES[stage].get("deps", []):
        path = _interpolate(dep)
        if not path.startswith(("data/", "artifacts/")):  # produced by earlier stages
            assert (ROOT / path).exists(), f"stage {stage!r} depends on missing {path}"


@pytest.mark.parametrize("stage", sorted(EXTRA_MODULES))
def test_stage_depends_on_the_pipeline_modules_it_runs(stage: str) -> None:
    deps = {_interpolate(dep) for dep in STAGES[stage].get("deps", [])}
    missing = [rel for rel in EXTRA_MODULES[stage] if rel not in deps and rel.split("/")[0] not in deps]
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_command_is_a_stage_module(stage: str) -> None:
    cmd = STAGES[stage]["cmd"]
    assert cmd.startswith(f"python -m stages.{stage} "), cmd
    assert (ROOT / "stages" / f"{stage}.py").is_file()


def test_every_interpolated_path_is_defined_in_params() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    for key in re.findall(r"\$\{([\w.]+)\}", text):
        node = PARAMS
        for part in key.split("."):
            assert part in node, f"dvc.yaml uses ${{{key}}}, not defined in params.yaml"
            node = node[part]


def test_dvc_parses_the_pipeline() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"DVC_NO_ANALYTICS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert listed == set(STAGES)
