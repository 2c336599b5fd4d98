"""Every system profile runs through `dvc repro` end to end (issue #10: pcme stopped at embed with
`attention must be (250, 7, 49), got (250, 1, 49)`).

One copy of the repository in a temp dir, shrunk to tiny sizes (the `tiny` shapes profile, D = 16, one epoch of two
batches, local-mode training, one extraction worker); prepare + extract run once, then each profile is applied
with `python -m stages.profile apply` and `dvc repro` rebuilds train -> embed -> evaluate / index / report. Slow:
measured 14.9 minutes for the six profiles (1.6 min prepare + extract, 1-4 min per profile) on the 2-core machine
shared with other jobs (load ~20), so it is marked slow and stays out of the default suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.profiles import SYSTEM_PROFILES

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "prepare": {"profile": "tiny"},
    "extract": {"workers": 1, "batch_size": 16, "items_per_unit": 16},
    "train": {
        "images_per_batch": 8,
        "limit_batches": 2,
        "eval_block_size": 16,
        "model": {"embed_dim": 16, "head_kwargs": {"attention_dim": 16, "mlp_ratio": 2}},
        "optim": {"epochs": 1, "warmup_epochs": 0.0},
        "ray": {"num_workers": 0, "max_failures": 0},
    },
    "embed": {"batch_size": 16},
    "evaluate": {"block_size": 16, "recall_ks": [1, 5, 10]},
    "index": {"candidates_per_element": 8},
    "report": {"num_images": 2, "num_text_queries": 2, "num_image_queries": 2},
}


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A copy of the tracked files with a tiny params.yaml; `dvc repro` runs without git (`core.no_scm`)."""
    root = tmp_path_factory.mktemp("repro") / "repo"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in tracked.splitlines():
        if rel.startswith(("dvc.lock", "metrics.json", "dvclive/", "plots/")) or not (REPO / rel).is_file():
            continue  # outputs of the committed run are not inputs
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    (root / ".dvc" / "config").write_text("[core]\n    analytics = false\n    no_scm = true\n")
    params = _merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(root),
    }
    _run([sys.executable, "-m", "dvc", "repro", "extract"], root, env)
    shutil.copy2(root / "params.yaml", root / "params.tiny.yaml")
    return root, env


@pytest.mark.slow
@pytest.mark.parametrize("name", SYSTEM_PROFILES)
def test_profile_runs_through_dvc_repro(tiny_repo: tuple[Path, dict[str, str]], name: str) -> None:
    root, env = tiny_repo
    shutil.copy2(root / "params.tiny.yaml", root / "params.yaml")
    _run([sys.executable, "-m", "stages.profile", "apply", name], root, env)
    _run([sys.executable, "-m", "dvc", "repro"], root, env)
    status = _run([sys.executable, "-m", "dvc", "status"], root, env)
    assert "changed" not in status.stdout, status.stdout  # every stage ran and is up to date
    metrics = json.loads((root / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "rsum" in flat and "NaN" not in flat
    config = json.loads((root / "artifacts" / "model" / "config.json").read_text())
    expected = yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text()) or {}
    head = expected.get("train", {}).get("model", {}).get("head", "slot")
    assert config["model"]["head"] == head
    assert (root / "reports" / "gallery.html").is_file()
