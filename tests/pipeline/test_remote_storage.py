"""Feature store and Ray Train storage in S3-compatible object storage: a moto server on loopback stands in for S3,
so a cluster without a shared filesystem is exercised end to end (write the store, read it, train from it)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.training import run_train
from setemb.feature_store import FeatureStore
from setemb.locations import exists, glob, join, remove_tree
from tests.pipeline.test_ray_train import tiny_params, write_store

BUCKET = "setemb-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point fsspec, pyarrow and Ray's workers
    at it for the duration of the module."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_feature_store_writes_and_reads_through_s3(s3, tmp_path):
    url = join(s3, "roundtrip", "features.zarr")
    local = write_store(tmp_path / "features.zarr", seed=3)
    write_store(url, seed=3)
    remote, here = FeatureStore.open(url), FeatureStore.open(local)
    assert remote.splits == here.splits == ["train", "val"]
    for split in remote.splits:
        for modality in ("image", "text"):
            a, b = remote.modality(split, modality), here.modality(split, modality)
            assert a.ids == b.ids
            rows = np.arange(len(a))
            for x, y in zip(a.batch(rows), b.batch(rows), strict=True):
                if y is None:
                    assert x is None
                else:
                    torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert glob(join(s3, "roundtrip"), "*.zarr") == ["features.zarr"]
    remove_tree(url)
    assert not exists(url)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureStore.open(url)


@pytest.mark.ray
def test_two_workers_train_from_s3_features_with_s3_checkpoints(s3, tmp_path):
    """Features read by each worker from S3, checkpoints written to S3, the driver exports the best model from
    there; a second run of the same config resumes from the S3 checkpoints instead of training again."""
    features = join(s3, "train", "features.zarr")
    write_store(features)
    storage = join(s3, "train", "training")
    params = tiny_params(num_workers=2, epochs=2)
    out, live = tmp_path / "model", tmp_path / "dvclive"
    summary = run_train(params, features=features, storage=storage, out=out, live=live, quiet=True)
    assert summary["epochs"] == 2 and summary["resumed"] is False
    assert glob(summary["run_dir"], "checkpoint_*")  # Ray's checkpoints are in the bucket
    config = json.loads((out / "config.json").read_text())
    assert config["val_rsum"] == summary["best_val_rsum"] and config["features"]["path"] == features
    assert json.loads((live / "metrics.json").read_text())["step"] == 1
    assert not list(tmp_path.glob(".model.*"))  # the driver's scratch export is gone
    again = run_train(params, features=features, storage=storage, out=tmp_path / "again", quiet=True)
    assert again["resumed"] is True and again["epochs"] == 2
    assert again["best_val_rsum"] == summary["best_val_rsum"]
