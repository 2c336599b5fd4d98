"""COCO benchmarks through eccv_caption on the real 5K test ids, with a planted ranking whose values are known.

Planted ranking: every image and caption is a 4-hot code over 40 dims (one digit of a 4-digit number per block of
10), so after normalisation every entry is exactly 0.5 and every cosine is exactly (shared digits) / 4. Rankings are
then integer overlaps with ties broken by the lower gallery row, computed here without any scorer, and the expected
metric values come from plain per-query formulas written below (not the package's, not setemb's).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.benchmarks import package_test_split
from pipeline.params import Params
from setemb.embedding_store import EmbeddingStoreWriter
from setemb.metrics import map_at_r, r_precision

CPI = 5


@pytest.fixture(scope="module")
def split() -> tuple[list[int], list[int]]:
    """Image-major COCO ids of the package: 5,000 image ids and their 25,000 caption annotation ids."""
    coco_ids, i2t = package_test_split()
    owner = {c: i for i, cs in i2t.items() for c in cs}
    images = [owner[int(c)] for c in coco_ids[::CPI]]
    return images, coco_ids.tolist()


def digits(n: np.ndarray) -> np.ndarray:
    return np.stack([n // 1000 % 10, n // 100 % 10, n // 10 % 10, n % 10], axis=1)  # [N, 4]


def codes(d: np.ndarray) -> np.ndarray:
    out = np.zeros((len(d), 40), dtype=np.float32)
    out[np.arange(len(d))[:, None], 10 * np.arange(4) + d] = 1.0
    return out  # [N, 40] 4-hot


def planted() -> tuple[np.ndarray, np.ndarray]:
    """Image row i codes the digits of i; caption k of image i the same digits with the last shifted by k."""
    image = digits(np.arange(5000))
    text = np.repeat(image, CPI, axis=0)
    text[:, 3] = (text[:, 3] + np.tile(np.arange(CPI), 5000)) % 10
    return image, text  # digits [5000, 4], [25000, 4]


def overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (codes(a) @ codes(b).T).astype(np.int8)  # [A, B] shared digits (0/1 products: exact)


def expected_lists(q_digits, g_digits, g_ids, need: dict[int, int], rows: dict[int, int]) -> dict[int, list[int]]:
    out = {}
    queries = sorted(need)
    for s in range(0, len(queries), 500):
        chunk = queries[s : s + 500]
        ov = overlap(q_digits[[rows[q] for q in chunk]], g_digits)
        order = np.argsort(-ov, axis=1, kind="stable")  # ties: lower gallery row first
        for q, row in zip(chunk, order, strict=True):
            out[q] = [g_ids[g] for g in row[: need[q]]]
    return out


def naive_eccv(lists: dict[int, list[int]], gt: dict[int, list[int]]) -> dict[str, float]:
    ap, rp, r1 = [], [], []
    for q, positives in gt.items():
        pos, ranked = set(positives), lists[q]
        R = len(pos)
        hits = [g in pos for g in ranked[:R]]
        rp.append(sum(hits) / R)
        ap.append(sum(sum(hits[: r + 1]) / (r + 1) for r in range(R) if hits[r]) / R)
        r1.append(float(ranked[0] in pos))
    return {"map_at_r": 100 * np.mean(ap), "r_precision": 100 * np.mean(rp), "r1": 100 * np.mean(r1)}


def naive_recall(lists: dict[int, list[int]], gt: dict[int, list[int]], k: int) -> float:
    return 100 * np.mean([bool(set(lists[q][:k]) & set(p)) for q, p in gt.items()])


def write_inputs(tmp: Path, images: list[int], captions: list[int]) -> dict[str, str]:
    """dataset_coco.json (sentids unlike annotation ids, captions in another order than the annotations),
    captions_val2014.json (plus a 6th caption for some images) and instances_val2014.json (planted categories)."""
    rng = np.random.default_rng(0)
    entries, anns = [], []
    for n, iid in enumerate(images):
        mine = captions[CPI * n : CPI * n + CPI]
        sentences = [{"raw": f"caption number {c} ", "sentid": 10_000_000 + CPI * n + j} for j, c in enumerate(mine)]
        entries.append({"filepath": "val2014", "filename": f"COCO_val2014_{iid:012d}.jpg", "cocoid": iid,
                        "imgid": n, "split": "test", "sentences": sentences})  # fmt: skip
        anns += [{"image_id": iid, "id": c, "caption": f"caption  number {c}"} for c in mine]
        if n % 7 == 0:
            anns.append({"image_id": iid, "id": 900_000_000 + n, "caption": "a sixth caption"})
    entries.append({"filename": "train.jpg", "cocoid": 1, "imgid": 5000, "split": "train",
                    "sentences": [{"raw": "t", "sentid": 1}] * 5})  # fmt: skip
    rng.shuffle(anns)
    (tmp / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    (tmp / "captions_val2014.json").write_text(json.dumps({"annotations": anns}))
    # categories: groups of 8 images share 6 categories; odd images add one more (distance 1); every 50th has none.
    inst = []
    for n, iid in enumerate(images):
        if n % 50 == 49:
            continue
        group = np.random.default_rng(n // 8).choice(90, size=7, replace=False) + 1
        cats = group[:6].tolist() + ([int(group[6])] if n % 2 else [])
        inst += [{"image_id": iid, "category_id": c} for c in cats]
    (tmp / "instances_val2014.json").write_text(json.dumps({"annotations": inst}))
    return {name: str(tmp / f"{name}.json") for name in ("dataset_coco", "captions_val2014", "instances_val2014")}


def naive_pm_sets(instances: str, images: list[int], captions: list[int], zeta: int = 2):
    labels: dict[int, set[int]] = {}
    for ann in json.loads(Path(instances).read_text())["annotations"]:
        labels.setdefault(ann["image_id"], set()).add(ann["category_id"])
    own = {iid: captions[CPI * n : CPI * n + CPI] for n, iid in enumerate(images)}
    by_set: dict[frozenset, list[int]] = {}
    for iid, cats in labels.items():
        by_set.setdefault(frozenset(cats), []).append(iid)
    near = {a: [i for b, ids in by_set.items() if len(a ^ b) <= zeta for i in ids] for a in by_set}
    i2t, t2i = {}, {}
    for a in labels:
        partners = sorted(b for b in near[frozenset(labels[a])] if b != a)
        if partners:
            i2t[a] = [c for b in partners for c in own[b]]
            for c in own[a]:
                t2i[c] = partners
    return i2t, t2i


def write_store(path: Path, images: list[int], image_digits: np.ndarray, text_digits: np.ndarray) -> Path:
    writer = EmbeddingStoreWriter(path, attrs={"similarity": {"name": "max_similarity", "kwargs": {}}})
    img = writer.require_set("test/image", ids=[str(i) for i in images], num_embeddings=1, embed_dim=40)
    img.write_all(torch.from_numpy(codes(image_digits))[:, None])
    ids = [str(10_000_000 + c) for c in range(len(text_digits))]  # the Karpathy sentids of write_inputs
    txt = writer.require_set("test/text", ids=ids, num_embeddings=1, embed_dim=40,
                             caption_to_image=np.repeat(np.arange(len(images)), CPI))  # fmt: skip
    txt.write_all(torch.from_numpy(codes(text_digits))[:, None])
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def planted_case(split, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Inputs, the planted rankings and the expected values (plain formulas) over the real test ids."""
    from eccv_caption import Metrics

    images, captions = split
    tmp = tmp_path_factory.mktemp("coco")
    files = write_inputs(tmp, images, captions)
    image_digits, text_digits = planted()
    gts = Metrics()
    image_rows = {iid: r for r, iid in enumerate(images)}
    caption_rows = {cid: r for r, cid in enumerate(captions)}
    pm = naive_pm_sets(files["instances_val2014"], images, captions)

    def lists(direction: str, gt_sets: list[dict]) -> dict[int, list[int]]:
        need: dict[int, int] = {}
        for gt in gt_sets:
            for q, p in gt.items():
                need[q] = max(need.get(q, 0), len(p), 10)
        if direction == "i2t":
            return expected_lists(image_digits, text_digits, captions, need, image_rows)
        return expected_lists(text_digits, image_digits, images, need, caption_rows)

    expected: dict[str, dict[str, float]] = {"eccv_caption": {}, "cxc": {}, "pmrp": {}}
    for n, d in enumerate(("i2t", "t2i")):
        ranked = lists(d, [gts.eccv_gts[d], gts.cxc_gts[d], pm[n]])
        expected["eccv_caption"].update({f"{d}_{k}": v for k, v in naive_eccv(ranked, gts.eccv_gts[d]).items()})
        expected["cxc"].update({f"{d}_r{k}": naive_recall(ranked, gts.cxc_gts[d], k) for k in (1, 5, 10)})
        expected["pmrp"][d] = 100 * np.mean([len(set(ranked[q][: len(p)]) & set(p)) / len(p) for q, p in pm[n].items()])
    # the planted values are not degenerate
    assert 5 < expected["eccv_caption"]["t2i_r1"] < 95 and 1 < expected["pmrp"]["i2t"] < 99
    return {"files": files, "images": images, "captions": captions, "image_digits": image_digits,
            "text_digits": text_digits, "expected": expected, "gts": gts, "tmp": tmp}  # fmt: skip


def assert_planted(got: dict, expected: dict) -> None:
    for group, values in expected.items():
        assert set(got[group]) == set(values), group
        for key, value in values.items():
            assert got[group][key] == pytest.approx(value, abs=1e-9), (group, key)


def test_the_package_scores_the_planted_rankings(planted_case: dict) -> None:
    """compute_benchmarks (ids, list lengths, package call, percentages) on rankings planted without a scorer."""
    from pipeline.benchmarks import compute_benchmarks, pm_ground_truth

    c = planted_case
    image_digits, text_digits = c["image_digits"], c["text_digits"]

    def topk(q_digits, g_digits):
        def f(rows: list[int], k: int) -> np.ndarray:
            return np.argsort(-overlap(q_digits[rows], g_digits), axis=1, kind="stable")[:, :k]

        return f

    pm = pm_ground_truth(c["images"], instances_json=c["files"]["instances_val2014"], pm_dir=None)
    got = compute_benchmarks(["eccv_caption", "cxc", "pmrp"], topk(image_digits, text_digits),
                             topk(text_digits, image_digits), c["images"], c["captions"], ks=[1, 5, 10],
                             block=700, pm_gts=pm)  # fmt: skip
    assert_planted(got, c["expected"])
    assert list(got["cxc"]) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    assert list(got["pmrp"]) == ["i2t", "t2i"] and list(got["eccv_caption"])[:2] == ["i2t_map_at_r", "i2t_r_precision"]


def test_setemb_precision_metrics_agree_with_the_package(planted_case: dict) -> None:
    """setemb.metrics R-Precision / mAP@R on dense planted scores of the ECCV queries = the package's values."""
    c = planted_case
    images, captions, gts = c["images"], c["captions"], c["gts"]
    image_rows = {iid: r for r, iid in enumerate(images)}
    caption_rows = {cid: r for r, cid in enumerate(captions)}
    for d in ("i2t", "t2i"):
        gt = gts.eccv_gts[d]
        queries = sorted(gt)
        if d == "i2t":
            q, g, g_rows = (
                codes(c["image_digits"][[image_rows[x] for x in queries]]),
                codes(c["text_digits"]),
                caption_rows,
            )
        else:
            q, g, g_rows = (
                codes(c["text_digits"][[caption_rows[x] for x in queries]]),
                codes(c["image_digits"]),
                image_rows,
            )
        # ECCV i2t lists 2 positive captions that are not among the 25,000 (467259, 144675): they count in R but
        # can never be retrieved. Here they are extra gallery columns scoring -1, below every planted score (>= 0).
        absent = sorted({y for x in queries for y in gt[x] if y not in g_rows})
        assert len(absent) == (2 if d == "i2t" else 0)
        g_rows = {**g_rows, **{y: len(g_rows) + n for n, y in enumerate(absent)}}
        sims = torch.from_numpy(q @ g.T / 4)  # [Q, G] exact cosines of the planted codes
        sims = torch.cat([sims, torch.full((len(queries), len(absent)), -1.0)], dim=1)  # [Q, G + absent]
        relevance = torch.zeros(sims.shape, dtype=torch.bool)
        for r, x in enumerate(queries):
            relevance[r, [g_rows[y] for y in gt[x]]] = True
        assert map_at_r(sims, relevance) == pytest.approx(c["expected"]["eccv_caption"][f"{d}_map_at_r"], abs=1e-9)
        assert r_precision(sims, relevance) == pytest.approx(
            c["expected"]["eccv_caption"][f"{d}_r_precision"], abs=1e-9
        )


def test_the_stage_reports_the_planted_values(planted_case: dict, tmp_path: Path) -> None:
    """The evaluate stage end to end: store ids -> COCO ids by text, streaming top-k scoring, the package."""
    from pipeline.evaluation import metrics_table, run_evaluate

    c = planted_case
    store = write_store(tmp_path / "emb.zarr", c["images"], c["image_digits"], c["text_digits"])
    files = c["files"]
    params = Params.model_validate({
        "paths": {"dataset_json": files["dataset_coco"], "coco_captions": files["captions_val2014"],
                  "coco_instances": files["instances_val2014"]},
        "evaluate": {"split": "test", "protocol": "full", "benchmarks": ["recall", "eccv_caption", "cxc", "pmrp"],
                     "benchmark_ks": [1, 5, 10], "block_size": 1024},
    })  # fmt: skip
    got = run_evaluate(params, embeddings=store, metrics=tmp_path / "metrics.json", plots=tmp_path / "plots")
    assert_planted(got, c["expected"])
    assert got["full"]["t2i_r1"] == pytest.approx(20.0)  # only caption k=0 ranks its own image first
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["eccv_caption"] == pytest.approx(got["eccv_caption"]) and written["pmrp"] == pytest.approx(
        got["pmrp"]
    )
    table = metrics_table(written)
    assert {"eccv_caption.i2t_map_at_r", "cxc.t2i_r5", "pmrp.t2i"} <= set(table.columns[0]._cells)


def test_benchmarks_need_the_coco_files(tmp_path: Path, split) -> None:
    from pipeline.coco_ids import CocoIdError
    from stages.evaluate import run_evaluate

    images, captions = split
    files = write_inputs(tmp_path, images, captions)
    image_digits, text_digits = planted()
    store = write_store(tmp_path / "emb.zarr", images, image_digits, text_digits)

    def run(paths: dict, benchmarks: list[str], zeta: int = 2):
        params = Params.model_validate(
            {
                "paths": {"dataset_json": files["dataset_coco"], **paths},
                "evaluate": {"split": "test", "protocol": "full", "benchmarks": benchmarks, "pmrp_zeta": zeta},
            }
        )
        return run_evaluate(params, embeddings=store, metrics=tmp_path / "m.json", plots=tmp_path / "p")

    with pytest.raises(CocoIdError, match="need the COCO captions file captions_val2014.json"):
        run({}, ["recall", "eccv_caption"])
    with pytest.raises(CocoIdError, match="pmrp needs COCO instance labels: set paths.coco_instances"):
        run({"coco_captions": files["captions_val2014"]}, ["recall", "pmrp"])
    with pytest.raises(CocoIdError, match="pm_\\*.json files are zeta = 2; unset paths.coco_pm_dir for zeta 1"):
        run({"coco_captions": files["captions_val2014"], "coco_pm_dir": str(tmp_path)}, ["recall", "pmrp"], zeta=1)
    assert not (tmp_path / "m.json").exists()  # nothing half-written


def test_benchmark_params_and_table_rows(tmp_path: Path) -> None:
    from pipeline.params import ParamsError, load_params
    from stages.evaluate import metrics_table

    bad = tmp_path / "p.yaml"
    bad.write_text("evaluate:\n  benchmarks: [eccv_caption]\n")
    with pytest.raises(ParamsError, match=r"evaluate.benchmarks: .*must list recall"):
        load_params(bad)
    bad.write_text("evaluate:\n  benchmarks: [recall, eccv]\n")
    with pytest.raises(ParamsError, match=r"evaluate.benchmarks.1: Input should be 'recall', 'eccv_caption'"):
        load_params(bad)
    results = {
        "full": {"i2t_r1": 50.0},
        "eccv_caption": {"i2t_map_at_r": 26.2, "t2i_map_at_r": 48.0},
        "cxc": {"i2t_r1": 10.0},
        "pmrp": {"i2t": 40.0, "t2i": 41.0},
        "info": {"split": "test", "n_images": 5000, "n_captions": 25000, "similarity": "chamfer", "source": "x"},
    }
    rows = metrics_table(results).columns[0]._cells
    assert rows == ["i2t_r1", "eccv_caption.i2t_map_at_r", "eccv_caption.t2i_map_at_r", "cxc.i2t_r1", "pmrp.i2t",
                    "pmrp.t2i"]  # fmt: skip


@pytest.mark.parametrize("zeta", [0, 1, 2])
def test_plausible_match_sets_equal_the_naive_rule(planted_case: dict, zeta: int) -> None:
    from pipeline.benchmarks import pm_ground_truth

    c = planted_case
    got = pm_ground_truth(c["images"], instances_json=c["files"]["instances_val2014"], pm_dir=None, zeta=zeta)
    want = naive_pm_sets(c["files"]["instances_val2014"], c["images"], c["captions"], zeta)
    assert got[0] == {q: sorted(v) for q, v in want[0].items()} and got[1] == {q: sorted(v) for q, v in want[1].items()}
    assert len(got[0]) > 1000
