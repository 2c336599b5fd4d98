"""pipeline/study.py: cell fingerprints (what changes the trained model, what does not); pipeline/study_stats.py and
pipeline/study_verdict.py: paired comparisons over shared seeds with 95% t intervals, the verdict rules built on them
(a clear win holds, a clear loss does not, overlapping noise and one seed are inconclusive, pairing matters, sweeps are
judged against the runner-up), seed noise, tied rows left out."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from pipeline.params import Params
from pipeline.study import Cell, Variant, cell_fingerprint
from pipeline.study_stats import beats_all, best_of, paired, within
from pipeline.study_verdict import Row, seed_noise, verdict


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


# ------------------------------------------------------------------------------------------------ paired stats
WIN = {0: 110.0, 1: 112.0, 2: 111.0}  # vs BASE: +10, +12, +11
BASE = {0: 100.0, 1: 100.0, 2: 100.0}


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences() -> None:
    p = paired(WIN, BASE)
    assert p.seeds == (0, 1, 2) and p.mean == pytest.approx(11.0)
    # d = 10, 12, 11: s_d = 1, t_{0.975, 2} = 4.303
    assert p.half_width == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert p.half_width == pytest.approx(2.484, abs=1e-3)
    assert p.status == "holds" and paired(BASE, WIN).status == "does not hold"
    assert p.format() == "Δ +11.0 ± 2.5 (95% CI, 3 seeds)"
    # only shared, finite seeds pair up
    assert paired({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.0, 1: float("-inf"), 2: 0.0}).seeds == (0,)


def test_one_seed_or_none_is_inconclusive() -> None:
    one = paired({0: 200.0}, {0: 100.0})  # a huge gap, but nothing to judge its noise by
    assert one.status == "inconclusive" and one.half_width is None and "one seed" in one.format()
    assert paired({0: 1.0}, {1: 1.0}).status == "inconclusive" and paired({0: 1.0}, {1: 1.0}).format() == (
        "no shared seed"
    )


def test_overlapping_noise_is_inconclusive() -> None:
    noisy = {0: 104.0, 1: 97.0, 2: 102.0}  # vs BASE: +4, -3, +2: the interval straddles 0
    p = paired(noisy, BASE)
    assert p.low < 0 < p.high and p.status == "inconclusive"


def test_pairing_matters() -> None:
    """Seed luck moves both cells together: the unpaired means overlap, the per-seed difference is always +2."""
    a = {0: 102.0, 1: 122.0, 2: 142.0}
    b = {0: 100.0, 1: 120.0, 2: 140.0}
    welch = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False)
    assert welch.pvalue > 0.5  # unpaired: indistinguishable (means 122 ± 20 vs 120 ± 20)
    p = paired(a, b)
    assert p.mean == pytest.approx(2.0) and p.half_width == pytest.approx(0.0) and p.status == "holds"
    assert paired({0: 102.0, 1: 118.0, 2: 142.0}, b).status == "inconclusive"  # +2, -2, +2


def test_sweep_best_is_judged_against_the_runner_up() -> None:
    sweep = {1: BASE, 3: {0: 108.0, 1: 110.0, 2: 109.0}, 4: WIN, 6: {0: 100.0, 1: 101.0, 2: 99.0}}
    judged = best_of(sweep, 4)
    assert judged.status == "holds" and judged.comparisons[0][0] == "3"  # +2, +2, +2 over the runner-up K=3
    close = {**sweep, 3: {0: 111.0, 1: 111.0, 2: 110.0}}  # runner-up within the noise: -1, +1, +1
    assert best_of(close, 4).status == "inconclusive"
    ahead = {**sweep, 6: {0: 115.0, 1: 116.0, 2: 116.0}}  # another value beats it clearly
    assert best_of(ahead, 4).status == "does not hold" and best_of(ahead, 4).comparisons[0][0] == "6"
    # not the top by mean, but nothing beats it with an interval excluding 0: inconclusive, not "does not hold"
    edge = {**sweep, 6: {0: 118.0, 1: 105.0, 2: 111.5}}
    assert best_of(edge, 4).status == "inconclusive"
    assert best_of({4: {0: 1.0}, 3: {0: 0.0}}, 4).status == "inconclusive"  # one seed
    assert best_of({4: WIN}, 4).status == "inconclusive"  # nothing to compare with


def test_beats_all_and_within() -> None:
    assert beats_all(WIN, {"a": BASE, "b": {0: 105.0, 1: 106.0, 2: 104.0}}).status == "holds"
    mixed = beats_all(WIN, {"a": BASE, "b": {0: 115.0, 1: 116.0, 2: 117.0}})
    assert mixed.status == "does not hold" and mixed.comparisons[0][0] == "b"
    assert beats_all(WIN, {"a": BASE, "c": {0: 114.0, 1: 107.0, 2: 112.0}}).status == "inconclusive"
    drops = {"drop_0": {0: 109.5, 1: 111.6, 2: 110.4}, "drop_1": {0: 109.0, 1: 111.0, 2: 110.5}}  # costs < 1.2
    assert within(WIN, drops, margin=3.0).status == "holds"
    assert within(WIN, {"drop_0": BASE}, margin=3.0).status == "does not hold"  # costs 10-12
    assert within(WIN, drops, margin=None).status == "inconclusive"
    assert within({0: 1.0}, {"drop_0": {0: 1.0}}, margin=3.0).status == "inconclusive"


def test_seed_noise() -> None:
    rows = [
        _row("main", "dive", 100.0),
        _row("main", "dive", 104.0, seed=1),
        _row("main", "vsepp", 90.0),
        _row("main", "vsepp", 92.0, seed=1),
        _row("main", "pcme", 80.0),
    ]
    assert math.isclose(seed_noise(rows), math.sqrt((8.0 + 2.0) / 2))  # pooled over labels with 2 seeds
    assert seed_noise(rows[:1]) is None


# ----------------------------------------------------------------------------------------------------- verdict
def _row(grid: str, label: str, rsum: float, seed: int = 0, variant: str = "default", x=None, **tags) -> Row:
    return Row(grid, label, variant, seed, x, tags, {"rsum": rsum})


def _seeded(grid: str, label: str, values: dict[int, float], **kwargs) -> list[Row]:
    return [_row(grid, label, v, seed=s, **kwargs) for s, v in values.items()]


def _claims(rows: list[Row]) -> dict:
    return {c.claim.split(" (")[0]: c for c in verdict(rows, seed_noise(rows))}


def test_tied_rows_are_flagged_and_left_out_of_the_verdict() -> None:
    rows = _seeded("main", "dive", WIN) + _seeded("main", "vsepp", BASE) + _seeded("main", "pcme", WIN)
    for row in rows[-3:]:
        row.metrics.update(rsum=600.0, distinct_scores=1.0 / 80000)  # a saturated scorer: every pair tied
    claims = _claims(rows)
    assert claims["DivE retrieves better than every compared system"].status == "holds"
    assert "pcme" not in claims["DivE retrieves better than every compared system"].evidence


def test_verdict_reads_paired_intervals() -> None:
    rows = _seeded("main", "dive", {0: 300.0, 1: 310.0, 2: 305.0})
    rows += _seeded("main", "vsepp", {0: 250.0, 1: 262.0, 2: 254.0})  # DivE +50, +48, +51: holds
    rows += _seeded("main", "pvse", {0: 310.0, 1: 321.0, 2: 314.0})  # +10, +11, +9 over DivE: does not hold
    rows += _seeded("main", "pcme", {0: 300.0, 1: 303.0, 2: 309.0})  # PVSE vs PCME: +10, +18, +5
    k = {1: {0: 200.0, 1: 210.0, 2: 205.0}, 2: {0: 290.0, 1: 300.0, 2: 295.0}, 4: {0: 300.0, 1: 310.0, 2: 305.0}}
    k[6] = {0: 303.0, 1: 308.0, 2: 307.5}  # K=6 ahead by +3, -2, +2.5 on the same seeds: inconclusive
    for x, values in k.items():
        rows += _seeded("k", f"K={x}", values, x=x)
    rows += _seeded("similarity_x_head", "a", WIN, similarity="smooth_chamfer", head="slot")
    rows += _seeded("similarity_x_head", "b", BASE, similarity="max_similarity", head="slot")
    rows += _seeded("similarity_x_head", "c", {0: 109.0}, similarity="chamfer", head="slot")  # one seed
    claims = _claims(rows)
    every = claims["DivE retrieves better than every compared system"]
    assert every.status == "does not hold" and every.diff.mean == pytest.approx(-10.0)
    assert every.evidence.startswith("order: pvse 315.0 ± 5.6 > dive 305.0 ± 5.0") and "vs pvse: Δ -10.0 ±" in (
        every.evidence
    )
    assert claims["a set of embeddings beats a single vector"].status == "holds"
    assert claims["PVSE > PCME"].status == "inconclusive"  # +11 on average, but the interval reaches below 0
    best_k = claims["K = 4 is the best K"]
    assert best_k.status == "inconclusive" and "vs K = 6" in best_k.evidence
    assert claims["K = 4 beats K = 1"].status == "holds"
    assert claims["SPM + smooth-Chamfer beats max_similarity × slot"].status == "holds"
    one = claims["SPM + smooth-Chamfer beats chamfer × slot"]
    assert one.status == "inconclusive" and "one seed" in one.evidence
    assert all(c.evidence and c.diff is not None for c in claims.values())


def test_verdict_tables_3_and_5_are_paired_per_seed() -> None:
    rows = []
    for label, (sim, head), cv in (
        ("sc", ("smooth_chamfer", "slot"), {0: -1.3, 1: -1.1, 2: -1.2}),
        ("mp", ("match_probability", "slot"), {0: -1.6, 1: -1.4, 2: -1.5}),  # 0.3 lower on every seed
        ("pie", ("smooth_chamfer", "pienet"), {0: -5.3, 1: -5.0, 2: -5.2}),
    ):
        for seed, value in cv.items():
            row = _row("similarity_x_head", label, 100.0 + seed, seed=seed, similarity=sim, head=head)
            row.metrics.update(log_cv_image=value, log_cv_text=value + (0.5 if label == "mp" else 0.0))
            rows.append(row)
    for seed, (full, only0, only1, drop0, drop1) in enumerate(
        ((300.0, 250.0, 240.0, 299.0, 299.0), (310.0, 262.0, 251.0, 309.5, 308.8), (305.0, 255.0, 246.0, 304.0, 303.9))
    ):
        for variant, value in (("all", full), ("image_only_0", only0), ("image_only_1", only1),
                               ("image_drop_0", drop0), ("image_drop_1", drop1)):  # fmt: skip
            rows.append(_row("elements", "dive", value, seed=seed, variant=variant))
    rows += _seeded("main", "dive", {0: 100.0, 1: 104.0, 2: 102.0})  # seed noise σ = 2
    claims = verdict(rows, seed_noise(rows))
    by = {(c.source, c.claim.split(":")[0]): c for c in claims}
    image_cv = by[("Table 3", "SPM + SC keeps the most diverse image sets")]
    assert image_cv.status == "holds" and image_cv.diff.mean == pytest.approx(0.3)  # the closest rival decides
    assert by[("Table 3", "SPM + SC keeps the most diverse text sets")].status == "does not hold"  # MP +0.2
    assert by[("Table 5", "every single image element alone retrieves worse than the whole set")].status == "holds"
    cost = by[("Table 5", "leaving one image element out costs little")]
    assert cost.status == "holds" and "σ = 2.0" in cost.claim  # costs 0.5-1.2, intervals below σ = 2
    assert cost.diff.mean == pytest.approx(2.5 / 3)  # the interval reaching highest (drop 0: 1, 0.5, 1) decides
    noisier = [r for r in rows if not (r.variant == "image_drop_1" and r.seed == 1)]
    noisier.append(_row("elements", "dive", 308.0, seed=1, variant="image_drop_1"))  # costs 1.0, 2.0, 1.1
    assert verdict(noisier, 2.0)[-1].status == "inconclusive"  # mean 1.4 < σ, but the interval reaches above it


def test_every_system_profile_is_in_the_main_table_the_verdict_and_the_readme(tmp_path) -> None:
    """The 73-minute study of 2403b2e failed at its report: PCME++ was in the main grid but not in the report's
    system order. Every profile of ``SYSTEM_PROFILES`` must reach the table, the verdict and the README block."""
    from pipeline.profiles import SYSTEM_PROFILES
    from pipeline.study_readme import summary_block
    from pipeline.study_report import _section_main

    values = {name: {s: 100.0 + 10 * i + s for s in range(3)} for i, name in enumerate(SYSTEM_PROFILES)}
    rows = [row for name, v in values.items() for row in _seeded("main", name, v)]
    table = "\n".join(_section_main(rows))
    assert all(f"| {name} | 3 |" in table for name in SYSTEM_PROFILES)
    every = _claims(rows)["DivE retrieves better than every compared system"]
    assert all(name in every.evidence for name in SYSTEM_PROFILES)
    if {"pcme", "pcmepp"} <= set(SYSTEM_PROFILES):
        assert _claims(rows)["PCME++ improves on PCME, its predecessor"].diff.n == 3
    cells = [Cell("main", name, {}, seed=s, fingerprint=f"{name}{s}") for name in values for s in range(3)]
    records = {
        f"{name}{s}": {"train": {}, "variants": {Variant().key: {"metrics": {"full": {"rsum": v[s]}}}}}
        for name, v in values.items()
        for s in range(3)
    }
    block = summary_block(cells, records, [], epochs=5, seeds=3, report="docs/results.md")
    assert all(f"| {name} | " in block for name in SYSTEM_PROFILES)
