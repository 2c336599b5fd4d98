"""pipeline/indexing.py and the index params: the SetIndex / CompressedSetIndex kwargs chosen from the index params
and the database size; impossible compressed-index params fail at load, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.indexing import index_kwargs
from pipeline.params import Params, ParamsError, load_params
from setemb.index.compressed import CompressedSetIndex
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


@pytest.mark.parametrize(
    ("index", "items", "expected"),
    [  # 1M sets of K=4 gives the configuration bench_search.py measured (README "Benchmarks")
        ({"kind": "ivf_pq"}, 1_000_000, {"kind": "ivf_pq", "nlist": 2048, "nprobe": 64, "pq_m": 32, "pq_bits": 8,
                                         "rerank": 64, "cache_bytes": 64 << 20}),
        ({"kind": "ivf_sq8", "rerank_depth": 32, "rerank_cache_mb": 0.5}, 100,
         {"kind": "ivf_sq8", "nlist": 10, "nprobe": 10, "rerank": 32, "cache_bytes": 1 << 19}),
        ({"kind": "ivf_pq", "pq_m": 8, "pq_bits": 4, "nlist": 64, "nprobe": 8}, 200_000,
         {"kind": "ivf_pq", "nlist": 64, "nprobe": 8, "pq_m": 8, "pq_bits": 4}),
    ],
)  # fmt: skip
def test_compressed_index_kwargs_follow_params_and_size(tmp_path: Path, index: dict, items: int, expected: dict):
    params = Params.model_validate(params_dict(tmp_path, **index) | {"train": {"model": {"embed_dim": 256}}})
    kwargs = index_kwargs(params, items, 4)
    assert {key: kwargs[key] for key in expected} == expected
    assert "storage_dtype" not in kwargs and "hnsw_m" not in kwargs  # no float vectors of its own
    if kwargs["kind"] == "ivf_sq8":
        assert "pq_m" not in kwargs
    CompressedSetIndex(256, 4, **kwargs)  # the kwargs are the constructor's


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"kind": "ivf_pq", "pq_m": 5}, r"index\.pq_m=5 must divide the embedding width train\.model\.embed_dim=16"),
        ({"kind": "ivf_pq", "pq_bits": 17}, r"index\.pq_bits: Input should be less than or equal to 16"),
        ({"kind": "ivf_sq8", "rerank_depth": 0}, r"index\.rerank_depth: Input should be greater than 0"),
        ({"kind": "ivf_sq8", "rerank_cache_mb": -1}, r"index\.rerank_cache_mb: Input should be greater than or equal"),
        ({"kind": "ivf_pq", "nlist": 8, "nprobe": 16}, r"index\.nprobe=16 probes more lists than index\.nlist=8"),
        ({"kind": "ivf_opq"}, r"index\.kind: Input should be .*'ivf_sq8' or 'ivf_pq'"),
        ({"kind": "ivf_sq8", "rerank_size": 8}, r"index\.rerank_size: Extra inputs are not permitted"),
    ],
)
def test_impossible_compressed_params_fail_naming_the_key(tmp_path: Path, index: dict, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_dict(tmp_path, **index)))
    with pytest.raises(ParamsError, match=message) as e:
        load_params(path)
    assert len(str(e.value).splitlines()) == 2  # "invalid <file>:" + one line for the one problem


def test_pq_m_dividing_the_width_is_valid(tmp_path: Path) -> None:
    params = Params.model_validate(params_dict(tmp_path, kind="ivf_pq", pq_m=4))  # D = 16
    assert (params.index.kind, params.index.pq_m) == ("ivf_pq", 4)
    assert Params.model_validate(params_dict(tmp_path, kind="ivf_sq8", pq_m=5)).index.kind == "ivf_sq8"  # pq unused
