"""pipeline/study.py: cell fingerprints (what changes the trained model, what does not); pipeline/study_verdict.py:
seed noise and the verdict rules (directions against the seed noise, tied rows left out)."""

from __future__ import annotations

import json
import math

from pipeline.params import Params
from pipeline.study import Variant, cell_fingerprint
from pipeline.study_verdict import Row, compare, seed_noise, verdict


def test_fingerprint_ignores_neutral_settings_only() -> None:
    params = Params().model_dump(mode="json")
    fp = cell_fingerprint(params, "d")
    neutral = json.loads(json.dumps(params))
    neutral["train"]["ray"].update(address="auto", max_failures=5)
    neutral["evaluate"]["image_elements"] = [0]  # evaluation is a variant, not the cell
    assert cell_fingerprint(neutral, "d") == fp
    for change in ({"seed": 1}, {"train": {**params["train"], "images_per_batch": 7}}):
        assert cell_fingerprint({**params, **change}, "d") != fp
    assert cell_fingerprint(params, "other features") != fp
    assert Variant("a", {"image_elements": [0]}).key == Variant("b", {"image_elements": [0]}).key != Variant().key


# ----------------------------------------------------------------------------------------------------- verdict
def _row(grid: str, label: str, rsum: float, seed: int = 0, variant: str = "default", x=None, **tags) -> Row:
    return Row(grid, label, variant, seed, x, tags, {"rsum": rsum})


def test_compare_and_seed_noise() -> None:
    assert compare(10.0, 5.0, 2.0) == "holds" and compare(5.0, 10.0, 2.0) == "does not hold"
    assert compare(6.0, 5.0, 2.0) == "inconclusive" and compare(5.1, 5.0, None) == "holds"
    rows = [
        _row("main", "dive", 100.0),
        _row("main", "dive", 104.0, seed=1),
        _row("main", "vsepp", 90.0),
        _row("main", "vsepp", 92.0, seed=1),
        _row("main", "pcme", 80.0),
    ]
    assert math.isclose(seed_noise(rows), math.sqrt((8.0 + 2.0) / 2))  # pooled over labels with 2 seeds
    assert seed_noise(rows[:1]) is None


def test_tied_rows_are_flagged_and_left_out_of_the_verdict() -> None:
    rows = [_row("main", "dive", 300.0), _row("main", "vsepp", 250.0), _row("main", "pcme", 600.0)]
    rows[2].metrics["distinct_scores"] = 1.0 / 80000  # a saturated scorer: every pair tied
    claims = {c.claim.split(" (")[0]: c for c in verdict(rows, None)}
    assert claims["DivE retrieves better than every compared system"].status == "holds"
    assert "pcme" not in claims["DivE retrieves better than every compared system"].evidence


def test_verdict_follows_the_numbers() -> None:
    rows = [
        _row("main", "dive", 300.0),
        _row("main", "dive", 302.0, seed=1),
        _row("main", "vsepp", 250.0),
        _row("main", "vsepp", 252.0, seed=1),
        _row("main", "pvse", 310.0),
        _row("main", "pvse", 312.0, seed=1),
    ]
    rows += [_row("k", f"K={k}", v, x=k) for k, v in {1: 200.0, 2: 290.0, 4: 300.0, 6: 301.0}.items()]
    rows += [
        _row("similarity_x_head", "a", 300.0, similarity="smooth_chamfer", head="slot"),
        _row("similarity_x_head", "b", 250.0, similarity="max_similarity", head="slot"),
    ]
    claims = {c.claim.split(" (")[0]: c for c in verdict(rows, seed_noise(rows))}
    assert claims["DivE retrieves better than every compared system"].status == "does not hold"  # PVSE +10 > σ
    assert "pvse 311.0" in claims["DivE retrieves better than every compared system"].evidence
    assert claims["a set of embeddings beats a single vector"].status == "holds"
    assert claims["K = 4 is the best K"].status == "inconclusive"  # K=6 ahead by 1.0 < σ = 1.41
    assert claims["K = 4 beats K = 1"].status == "holds"
    assert claims["SPM + smooth-Chamfer beats max_similarity × slot"].status == "holds"
    assert all(c.evidence for c in claims.values())
