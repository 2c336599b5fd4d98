"""The synthetic `shapes` dataset (pipeline/shapes.py): determinism, Karpathy format, relevance, atomic writes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import shapes
from pipeline.shapes import (
    COLOURS,
    SHAPES,
    SHAPES_PROFILES,
    CaptionQuery,
    ObjectQuery,
    Scene,
    ShapeObject,
    describe_scene,
    generate_shapes,
    load_relevance,
    query_holds,
    relation_holds,
    relevance_matrix,
    render,
    sample_scenes,
)
from setemb.data import missing_images, read_karpathy

TINY = {"train_images": 12, "val_images": 4, "test_images": 4, "image_size": 64}


def _digest(root: Path) -> dict[str, str]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "tiny", seed=0, **TINY)


def test_generation_is_deterministic_in_the_seed(tiny: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "again", seed=0, **TINY)
    other = generate_shapes(tmp_path / "other", seed=1, **TINY)
    assert _digest(again) == _digest(tiny)  # json bytes and every image's hash
    assert len(_digest(tiny)) == 20 + 3  # 20 images + dataset, relevance, generation
    assert (other / "dataset.json").read_bytes() != (tiny / "dataset.json").read_bytes()
    assert (other / "images" / "train_000000.jpg").read_bytes() != (tiny / "images" / "train_000000.jpg").read_bytes()


def test_readable_by_read_karpathy_with_five_distinct_captions(tiny: Path) -> None:
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        index = read_karpathy(tiny / "dataset.json", tiny / "images", split)
        assert index.dataset == "shapes" and index.n_images == n and index.n_captions == 5 * n
        assert missing_images(index) == []
        for i in range(n):
            assert len(set(index.captions[5 * i : 5 * i + 5])) == 5
    entry = json.loads((tiny / "dataset.json").read_text())["images"][0]
    assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
    assert entry["sentences"][0]["tokens"] == entry["sentences"][0]["raw"].lower().rstrip(".").split()


def test_load_relevance_own_image_is_relevant(tiny: Path) -> None:
    for split in ("train", "test"):
        index = read_karpathy(tiny / "dataset.json", tiny / "images", split)
        rel = load_relevance(tiny / "relevance.json", split, index)
        assert rel.shape == (index.n_captions, index.n_images) and rel.dtype == bool
        assert rel[np.arange(index.n_captions), index.caption_to_image].all()
    with pytest.raises(ValueError, match="unknown"):
        load_relevance(tiny / "relevance.json", "val", index)  # test captions are not val captions


def test_relevance_is_ambiguous_and_matches_reference() -> None:
    rng = np.random.default_rng(3)
    scenes = sample_scenes(200, rng)
    described = [describe_scene(s, rng) for s in scenes]
    queries = [q for d in described for _, q in d]
    owner = np.repeat(np.arange(200), 5)
    rel = relevance_matrix(queries, scenes)  # [1000, 200]
    assert rel[np.arange(1000), owner].all()
    per_caption = rel.sum(axis=1)
    assert (per_caption > 1).mean() > 0.3  # many captions describe several images
    assert (per_caption == 1).any()  # and some are specific
    kinds = {(q.second is not None, q.relation is not None) for q in queries}
    assert kinds == {(False, False), (True, False), (True, True)}
    for c in range(0, 1000, 7):  # vectorised == reference on a sample
        expected = [query_holds(queries[c], s) for s in scenes]
        np.testing.assert_array_equal(rel[c], expected)
    for d in described[:50]:  # captions of an image cover more than one of its objects
        assert len({q.first for _, q in d} | {q.second for _, q in d if q.second}) > 1


def test_relations_on_hand_built_scenes() -> None:
    circle = ShapeObject("circle", "red", "small", 0.2, 0.5)
    square = ShapeObject("square", "blue", "large", 0.6, 0.5)
    star = ShapeObject("star", "red", "small", 0.25, 0.9)
    assert relation_holds(circle, square, "left_of") and relation_holds(square, circle, "right_of")
    assert not relation_holds(circle, square, "above") and not relation_holds(circle, square, "below")
    assert relation_holds(circle, star, "above") and relation_holds(star, circle, "below")
    assert not relation_holds(circle, star, "left_of")  # 0.05 apart horizontally: below the margin
    scene = Scene((circle, square, star))
    mirrored = Scene(tuple(ShapeObject(o.shape, o.colour, o.size, 1 - o.cx, o.cy) for o in scene.objects))
    queries = [
        CaptionQuery(ObjectQuery("circle", "red"), ObjectQuery("square"), "left_of"),
        CaptionQuery(ObjectQuery("circle"), ObjectQuery("square", size="large"), "right_of"),
        CaptionQuery(ObjectQuery("circle"), ObjectQuery("circle")),  # needs two distinct circles
        CaptionQuery(ObjectQuery("circle", "blue")),
        CaptionQuery(ObjectQuery("star", size="small"), ObjectQuery("circle", "red"), "below"),
        CaptionQuery(ObjectQuery("star"), ObjectQuery("square")),
    ]
    expected = np.array([[1, 0], [0, 1], [0, 0], [0, 0], [1, 1], [1, 1]], dtype=bool)
    np.testing.assert_array_equal(relevance_matrix(queries, [scene, mirrored]), expected)
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds(circle, square, "behind")


def test_render_draws_solid_colours_at_object_centres() -> None:
    for k, shape in enumerate(SHAPES):
        colour = list(COLOURS)[k % len(COLOURS)]
        scene = Scene((ShapeObject(shape, colour, "large", 0.5, 0.5),))
        image = np.asarray(render(scene, 64, np.random.default_rng(k)))
        assert image.shape == (64, 64, 3)
        np.testing.assert_array_equal(image[32, 32], COLOURS[colour])
        assert np.abs(image[2, 2].astype(int) - COLOURS[colour]).max() > 40  # background differs


def test_regeneration_skipped_when_generation_json_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate_shapes(tmp_path / "ds", seed=5, **TINY)
    before = _digest(out)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated")

    monkeypatch.setattr(shapes, "_generate_into", fail)
    assert generate_shapes(tmp_path / "ds", seed=5, **TINY) == out
    assert _digest(out) == before
    with pytest.raises(AssertionError, match="regenerated"):  # other parameters do regenerate
        generate_shapes(tmp_path / "ds", seed=6, **TINY)
    assert _digest(out) == before  # and the failed attempt left the old dataset intact


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_render = shapes.render

    def flaky(*args: object, **kwargs: object):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(shapes, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "ds", seed=0, **TINY)
    assert not (tmp_path / "ds" / "dataset.json").exists()
    assert list(tmp_path.iterdir()) == []  # the partial temp dir is gone too


def test_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a shapes dataset"):
        generate_shapes(tmp_path / "ds", **TINY)


def test_profiles_fit_the_demo_budget() -> None:
    demo = SHAPES_PROFILES["demo"]
    total = demo["train_images"] + demo["val_images"] + demo["test_images"]
    assert total / 20 < 150  # EfficientNet-Lite0 at ~20 img/s must extract everything in < 2.5 min
    assert [SHAPES_PROFILES["study"][f"{s}_images"] for s in ("train", "val", "test")] == [8000, 1000, 1000]
