"""pipeline/indexing.py: the SetIndex kwargs chosen from the index params and the database size."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.indexing import index_kwargs
from pipeline.params import Params
from tests.stages.test_search import params_dict


@pytest.mark.parametrize(
    ("index", "items", "expected"),
    [
        ({}, 1000, {"kind": "flat"}),
        ({}, 200_000, {"kind": "ivf", "nlist": 1024, "nprobe": 32}),
        ({"kind": "auto", "nlist": 256, "nprobe": 8}, 200_000, {"kind": "ivf", "nlist": 256, "nprobe": 8}),
        ({"kind": "ivf"}, 100, {"kind": "ivf", "nlist": 10, "nprobe": 10}),  # 400 elements: 10 lists of 40 points
        ({"kind": "hnsw", "hnsw_m": 16}, 100, {"kind": "hnsw", "hnsw_m": 16}),
    ],
)
def test_index_kwargs_follow_params_and_size(tmp_path: Path, index: dict, items: int, expected: dict) -> None:
    params = Params.model_validate(params_dict(tmp_path, **index))
    kwargs = index_kwargs(params, items, 4)
    assert {key: kwargs[key] for key in expected} == expected
    assert kwargs["storage_dtype"] == "float32" and kwargs["candidates_per_element"] == 64
    if kwargs["kind"] == "ivf":
        assert kwargs["train_size"] >= min(items * 4, 40 * kwargs["nlist"])
