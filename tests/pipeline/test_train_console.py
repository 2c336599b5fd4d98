"""The console of a distributed training run: one summary line per epoch from the driver, no Ray report lines."""

from __future__ import annotations

import pytest

from pipeline.ray_train import run_training
from tests.pipeline.test_ray_train import tiny_params, write_store


@pytest.mark.slow
@pytest.mark.ray
def test_two_workers_print_one_summary_per_epoch_and_no_ray_report_lines(tmp_path, capfd, caplog):
    import ray

    assert not ray.is_initialized()  # run_training must start (and configure) Ray itself
    store = write_store(tmp_path / "features.zarr")
    with caplog.at_level("INFO", logger="pipeline.ray_train"):
        result = run_training(tiny_params(num_workers=2, epochs=2), features=store, storage_path=tmp_path / "ray")
    assert [h["epoch"] for h in result.history] == [0, 1]
    out, err = capfd.readouterr()
    assert "Reporting training result" not in out + err
    assert "TrainingReport(" not in out + err
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [s.split(":")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"]
    assert all("val RSUM" in s for s in summaries)
