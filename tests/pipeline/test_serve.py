"""The Ray Serve app (pipeline/serve_app.py, serve_api.py, serve_page/) against ONE running instance per session.

A module fixture builds a tiny real chain (shapes -> extract with the packaged backbones -> one short epoch ->
embed -> index), then starts the app on loopback with 3 index shards per database and a bearer token. The image
database is a flat ``SetIndex``; the caption database is a compressed ``ivf_pq`` index built by the same stage (its
shards keep codes only and re-rank from the embedding store). Every test talks HTTP to it: results are checked
against the unsharded saved index and brute force, bad input must get a 4xx with one clear message while the server
keeps answering, and the search page is driven in headless Chromium (Playwright).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.embedding import run_embed
from pipeline.feature_cache import run_extract
from pipeline.indexing import MANIFEST_JSON, load_database_index, run_index
from pipeline.params import load_params
from pipeline.query import QueryEncoder
from pipeline.ray_train import run_training
from pipeline.shapes import generate_shapes
from setemb.embedding_store import EmbeddingStore
from setemb.index import SetIndex
from setemb.index.compressed import CompressedSetIndex
from setemb.similarity import score

pytestmark = pytest.mark.ray
CPI, N_TEST, K, D, SHARDS = 2, 9, 2, 16, 3
TOKEN = "s3cret-test-token"
MAX_BODY = 2 * 1024 * 1024
QUERY = "a red circle to the left of a blue square"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """shapes -> features -> model (1 short epoch, Ray local mode) -> embeddings (with attention) -> index."""
    root = tmp_path_factory.mktemp("serve")
    data = generate_shapes(root / "shapes", seed=0, train_images=8, val_images=1, test_images=N_TEST, image_size=64)
    config = {
        "seed": 0,
        "paths": {"index": str(root / "index"), "model": str(root / "model"), "features": str(root / "f.zarr")},
        "extract": {"splits": ["train", "test"], "captions_per_image": CPI, "batch_size": 8, "items_per_unit": 8,
                    "workers": 1},
        "train": {"images_per_batch": 4, "model": {"embed_dim": D, "num_embeddings": K, "head": "slot"},
                  "loss": {"name": "triplet", "kwargs": {"similarity": "smooth_chamfer", "margin": 0.2}},
                  "optim": {"lr": 0.003, "epochs": 1, "amp": False}, "ray": {"num_workers": 0, "max_failures": 0},
                  "limit_batches": 2},
        "embed": {"splits": ["test"], "batch_size": 4},
        "index": {"split": "test", "storage_dtype": "float32"},
    }  # fmt: skip
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(config))
    params = load_params(params_file)
    run_extract(params.extract, root / "f.zarr", dataset_json=data / "dataset.json", image_root=data / "images")
    run_training(params, features=root / "f.zarr", storage_path=root / "training", model_dir=root / "model",
                 quiet=True)  # fmt: skip
    run_embed(params, features=root / "f.zarr", model=root / "model", out=root / "emb.zarr", quiet=True)
    run_index(params, embeddings=root / "emb.zarr", model=root / "model", out=root / "index",
              dataset_json=data / "dataset.json", image_root=data / "images")  # fmt: skip
    _compress_text_database(config, root)
    return {"root": root, "data": data, "params_file": params_file, "params": params,
            "store": EmbeddingStore.open(root / "emb.zarr")}  # fmt: skip


def _compress_text_database(config: dict, root: Path) -> None:
    """Swap ``index/text`` for an ivf_pq index of the same captions, written by `run_index` into a sibling directory
    (same depth: its store reference, relative to the sub-index, stays valid); the manifest entry follows."""
    pq = {**config, "index": {**config["index"], "kind": "ivf_pq", "pq_m": 4, "pq_bits": 4}}  # 36 elements >= 16
    (root / "pq.yaml").write_text(yaml.safe_dump(pq))
    built = run_index(load_params(root / "pq.yaml"), embeddings=root / "emb.zarr", model=root / "model",
                      out=root / "index_pq", modalities=["text"])  # fmt: skip
    shutil.rmtree(root / "index" / "text")
    (root / "index_pq" / "text").rename(root / "index" / "text")
    manifest = json.loads((root / "index" / MANIFEST_JSON).read_text())
    manifest["indexes"]["text"] = built["indexes"]["text"]
    (root / "index" / MANIFEST_JSON).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def server(chain: dict):
    """The app, started once: 3 shards per database, token required, 2 MB body limit, loopback."""
    import ray
    from ray import serve

    from pipeline.serve_api import ServeSettings
    from pipeline.serve_app import run_serve

    root = chain["root"]
    settings = ServeSettings(index=str(root / "index"), model=str(root / "model"), params=str(chain["params_file"]),
                             features=str(root / "f.zarr"), shards=SHARDS, token=TOKEN,
                             max_upload_bytes=MAX_BODY)  # fmt: skip
    url = run_serve(settings, host="127.0.0.1", port=_free_port(), num_cpus=2, blocking=False)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    try:
        yield {"url": url, "client": client}
    finally:
        client.close()
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def encoder(chain: dict) -> QueryEncoder:
    return QueryEncoder(chain["root"] / "model", chain["params"])


def unsharded(chain: dict, database: str, sets: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    index = load_database_index(chain["root"] / "index" / database)  # image: SetIndex, text: CompressedSetIndex
    scores, rows = index.search(sets, k=k)
    return rows[0].tolist(), scores[0].tolist()


def brute_force(chain: dict, database: str, sets: torch.Tensor, k: int) -> list[int]:
    similarity = chain["store"].attrs["similarity"]
    _, rows = score(sets, chain["store"][f"test/{database}"].embeddings, similarity["name"], topk=k,
                    **similarity["kwargs"])  # fmt: skip
    return rows[0].tolist()


def test_the_caption_database_is_compressed(chain: dict) -> None:
    assert isinstance(load_database_index(chain["root"] / "index" / "image"), SetIndex)
    text = load_database_index(chain["root"] / "index" / "text")
    assert isinstance(text, CompressedSetIndex) and text.config["kind"] == "ivf_pq" and len(text) == N_TEST * CPI


def test_health_reports_databases_and_shards(server: dict, chain: dict) -> None:
    health = server["client"].get("/health").json()
    assert health["status"] == "ok"
    assert health["databases"] == {"image": N_TEST, "text": N_TEST * CPI}
    assert health["shards"] == {"image": SHARDS, "text": SHARDS}


def test_text_search_over_shards_equals_the_unsharded_index_and_brute_force(server, chain, encoder) -> None:
    k = N_TEST
    answer = server["client"].post("/search/text", json={"text": QUERY, "k": k})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    sets = encoder.encode_text([QUERY])  # [1, L, D]
    rows, scores = unsharded(chain, "image", sets, k)
    assert [r["row"] for r in results] == rows == brute_force(chain, "image", sets, k)
    np.testing.assert_allclose([r["score"] for r in results], scores, rtol=1e-5, atol=1e-5)
    ids = chain["store"]["test/image"].ids
    vectors = chain["store"]["test/image"].embeddings
    for r in results:
        assert r["id"] == ids[r["row"]] and Path(r["path"]).is_file() and r["rank"] == results.index(r) + 1
        unit = torch.nn.functional.normalize
        cos = unit(sets[0], dim=-1) @ unit(vectors[r["row"]], dim=-1).T  # [L, K]
        assert [m["result_element"] for m in r["matches"]] == cos.argmax(1).tolist()  # [L] best image element
        assert r["best"]["cosine"] == pytest.approx(cos.max().item(), abs=1e-5)
        assert r["attention_map"] == f"/items/image/{r['row']}/attention/{r['best']['result_element']}.png"


@pytest.mark.parametrize("database", ["image", "text"])
def test_set_search_merges_shards_exactly(server, chain, database: str) -> None:
    query = torch.nn.functional.normalize(torch.randn(3, D, generator=torch.Generator().manual_seed(7)), dim=-1)
    n = N_TEST if database == "image" else N_TEST * CPI
    answer = server["client"].post("/search/sets", json={"database": database, "embeddings": query.tolist(), "k": n})
    assert answer.status_code == 200, answer.text
    rows, scores = unsharded(chain, database, query[None], n)
    got = answer.json()["results"]
    assert [r["row"] for r in got] == rows == brute_force(chain, database, query[None], n)
    np.testing.assert_allclose([r["score"] for r in got], scores, rtol=1e-5, atol=1e-5)


def test_image_upload_ranks_captions_like_the_unsharded_index(server, chain, encoder) -> None:
    path = Path(json.loads((chain["root"] / "index/items.json").read_text())["images"][0]["path"])
    answer = server["client"].post("/search/image", files={"image": ("q.png", path.read_bytes(), "image/png")},
                                   data={"k": "5", "attention": "true"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    body = answer.json()
    sets = encoder.encode_images([path])
    rows, _ = unsharded(chain, "text", sets, 5)
    assert [r["row"] for r in body["results"]] == rows
    assert all(r["caption"] for r in body["results"])
    assert len(body["query"]["attention"]) == K and body["query"]["attention"][0].startswith("data:image/png;base64,")


def test_item_metadata_image_file_and_attention_png(server, chain) -> None:
    client = server["client"]
    items = json.loads((chain["root"] / "index/items.json").read_text())
    meta = client.get("/items/image/1").json()
    assert meta["id"] == items["images"][1]["id"] and meta["path"] == items["images"][1]["path"]
    assert client.get("/items/image/1/file").content == Path(meta["path"]).read_bytes()
    caption = client.get("/items/text/3").json()
    assert caption["caption"] == items["captions"][3]["text"] and caption["image"] == items["captions"][3]["image"]
    png = client.get(meta["attention"][1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert max(im.size) == 224 and np.asarray(im.convert("RGB")).std() > 5
    assert client.get("/items/image/999").status_code == 404


def test_metrics_are_prometheus_text(server) -> None:
    server["client"].get("/health")
    text = server["client"].get("/metrics").text
    assert 'setemb_requests_total{endpoint="/health",method="GET",status="200"}' in text
    assert 'setemb_database_items{database="image"} 9.0' in text and "setemb_request_seconds_bucket" in text


def _png(width: int, height: int) -> bytes:
    """A 1-bit PNG of zeros: a few kB on the wire, ``width * height`` pixels when decoded."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    raw = zlib.compress(row * height, 9)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _jpeg_truncated() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD = {
    "empty text": ("post", "/search/text", {"json": {"text": "   "}}, 422, "non-empty"),
    "100 kB text": ("post", "/search/text", {"json": {"text": "a " * 51_200}}, 413, "characters"),
    "non-image upload": ("post", "/search/image", {"files": {"image": ("x.txt", b"hello " * 100, "text/plain")}}, 415,
                         "not an image"),
    "truncated jpeg": ("post", "/search/image", {"files": {"image": ("t.jpg", _jpeg_truncated(), "image/jpeg")}}, 422,
                       "could not be decoded"),
    "decompression bomb": ("post", "/search/image", {"files": {"image": ("b.png", _png(20_000, 20_000), "image/png")}},
                           413, "pixels"),
    "oversized body": ("post", "/search/image", {"files": {"image": ("big.png", b"\0" * (MAX_BODY + 10), "image/png")}},
                       413, "bytes"),
    "wrong json fields": ("post", "/search/text", {"json": {"txt": "a red circle"}}, 422, "text: Field required"),
    "malformed json": ("post", "/search/text", {"content": b"{not json", "headers": {"Content-Type":
                       "application/json"}}, 422, "JSON"),
    "wrong k type": ("post", "/search/text", {"json": {"text": "a", "k": "ten"}}, 422, "k:"),
    "k out of range": ("post", "/search/text", {"json": {"text": "a", "k": 0}}, 422, "k must be"),
    "bad set shape": ("post", "/search/sets", {"json": {"database": "image", "embeddings": [[1.0, 2.0]]}}, 422,
                      f"[L, {D}]"),
    "image upload as json": ("post", "/search/image", {"json": {"image": "x"}}, 422, "image: Field required"),
    "unknown endpoint": ("get", "/nowhere", {}, 404, "no endpoint GET /nowhere"),
    "wrong method": ("get", "/search/text", {}, 405, "not allowed"),
    "missing token": ("get", "/health", {"headers": {"Authorization": ""}}, 401, "missing bearer token"),
    "wrong token": ("get", "/health", {"headers": {"Authorization": "Bearer nope"}}, 401, "wrong bearer token"),
    "missing token on the page": ("get", "/", {"headers": {"Authorization": ""}}, 401, "missing bearer token"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gets_one_clear_4xx_and_the_server_keeps_answering(server, case: str) -> None:
    method, path, kwargs, status, needle = BAD[case]
    response = getattr(server["client"], method)(path, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and needle in body["error"] and "\n" not in body["error"], body
    good = server["client"].post("/search/text", json={"text": QUERY, "k": 3})
    assert good.status_code == 200 and len(good.json()["results"]) == 3


def test_page_in_headless_chromium_text_query_and_image_upload(server, chain, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = server["url"]
    image = Path(json.loads((chain["root"] / "index/items.json").read_text())["images"][2]["path"])
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{url}/?token={TOKEN}")  # sets the cookie, redirects to /
            page.fill("#text", QUERY)
            page.click("#text-go")
            page.wait_for_selector("body[data-state=done]", timeout=30_000)
            tiles = page.locator(".tile.image")
            assert tiles.count() == int(page.get_attribute("body", "data-results")) == 9
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            assert page.locator(".tile.image img.attention").count() == 9
            shown = [float(t) for t in page.locator(".tile.image .score").all_inner_texts()]
            assert shown == sorted(shown, reverse=True)
            page.set_input_files("#image", str(image))
            page.click("#image-go")
            page.wait_for_function("document.querySelector('.tile.caption') !== null", timeout=30_000)
            page.wait_for_selector("body[data-state=done]")
            captions = page.locator(".tile.caption .caption").all_inner_texts()
            assert len(captions) == 10 and all(c.strip() for c in captions)
            assert page.locator("#query img").count() == K
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    assert requested and all(r.startswith(url) or r.startswith("data:") for r in requested), requested


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions"]  # fmt: skip


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail("chromium is not installed; the page test needs a real headless browser: `apt-get install -y chromium`")
