"""pipeline/training.py: the run fingerprint that names a training run (what changes the result, and what does not)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.training import features_fingerprint, run_name_for
from tests.stages.test_train import tiny_params_dict, write_params, write_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_store(tmp_path_factory.mktemp("features") / "features.zarr")


def test_run_name_changes_with_what_changes_the_result(tmp_path: Path, store: Path) -> None:
    params = load_params(write_params(tmp_path / "p.yaml"))
    digest = features_fingerprint(store)
    name = run_name_for(params, digest)
    assert name.startswith("train-") and len(name) == len("train-") + 12
    neutral = tiny_params_dict(ray={"num_workers": 0, "max_failures": 3, "address": "auto", "cpus_per_worker": 2})
    assert run_name_for(load_params(write_params(tmp_path / "q.yaml", neutral)), digest) == name
    for change in ({"optim": {"epochs": 3}}, {"ray": {"num_workers": 2}}, {"limit_batches": 1}):
        other = load_params(write_params(tmp_path / "r.yaml", tiny_params_dict(**change)))
        assert run_name_for(other, digest) != name, change
    assert features_fingerprint(write_store(tmp_path / "other.zarr", seed=1)) != digest
    assert features_fingerprint(write_store(tmp_path / "same.zarr")) == digest
