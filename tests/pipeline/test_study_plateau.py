"""pipeline/study_plateau.py: the plateau rule on constructed validation curves (within 1% of the best mean, and no
later epoch better by a paired 95% CI), and the report sections that say where the study's epoch count came from."""

from __future__ import annotations

import pytest

from pipeline.study import Cell
from pipeline.study_plateau import (
    check_cells,
    collect_curves,
    plateau_epoch,
    plateau_summary,
    reaches_plateau,
    section_plateau,
    section_training_length,
)


def _seeds(curve: list[float], offsets: tuple[float, ...] = (0.0, 3.0, -2.0)) -> dict[int, list[float]]:
    """The same curve on every seed, shifted by each seed's luck."""
    return {seed: [v + off for v in curve] for seed, off in enumerate(offsets)}


def test_plateau_is_the_first_epoch_near_the_best_with_no_later_gain() -> None:
    curves = {
        0: [60.0, 90.0, 120.0, 136.0, 139.0, 140.0, 139.5, 139.0],
        1: [63.0, 93.0, 123.0, 139.0, 142.0, 141.0, 143.0, 141.5],
        2: [58.0, 88.0, 118.0, 134.0, 137.0, 138.5, 136.5, 137.5],
    }
    # means: epoch 4 136.3 (below 1% of the best, 139.8 at epoch 6), epoch 5 139.3; the later gains over epoch 5
    # (+1, -1, +1.5 / +0.5, +1, -0.5 / 0, -0.5, +0.5) all have intervals reaching below 0
    p = plateau_epoch("dive", curves)
    assert (p.epoch, p.best_epoch, p.epochs, p.seeds) == (5, 6, 8, 3)
    assert p.plateau_mean == pytest.approx(418.0 / 3)


def test_a_consistent_later_gain_moves_the_plateau() -> None:
    """Epoch 4 is within 1% of the best, but epoch 5 beats it on every seed (+1.5, +1.5, +1.6): rejected."""
    curves = {
        0: [100.0, 190.0, 197.0, 198.5, 200.0, 200.0],
        1: [102.0, 193.0, 199.0, 200.0, 201.5, 201.0],
        2: [98.0, 188.0, 196.0, 197.0, 198.6, 199.2],
    }
    assert plateau_epoch("dive", curves).epoch == 5
    curves[0][4:] = [198.0, 198.5]  # now the gains over epoch 4 are -0.5, +1.5, +1.6: not significant
    assert plateau_epoch("dive", curves).epoch == 4


def test_still_rising_and_one_seed() -> None:
    rising = _seeds([10.0, 40.0, 70.0, 100.0, 130.0])
    assert plateau_epoch("dive", rising).epoch == 5
    one = {0: [50.0, 99.5, 100.0, 99.0]}  # one seed: only the 1% part applies
    p = plateau_epoch("vsepp", one)
    assert (p.epoch, p.seeds) == (2, 1)
    with pytest.raises(ValueError, match="no validation RSUM"):
        plateau_epoch("dive", {0: [None, None]})


def test_summary_and_report_sections_name_the_run() -> None:
    cells = [
        Cell("plateau", system, {}, seed=seed, fingerprint=f"{system}{seed}")
        for system in ("dive", "vsepp")
        for seed in range(3)
    ]
    cells.append(Cell("main", "dive", {}, seed=0, fingerprint="main"))
    curve = {
        "dive": ([60.0, 100.0, 120.0, 121.0], [61.0, 101.0, 122.0, 121.5], [62.0, 102.0, 121.0, 123.0]),
        "vsepp": ([50.0, 80.0, 80.5, 80.2], [51.0, 82.0, 81.5, 81.9], [52.0, 81.0, 82.5, 81.5]),
    }
    records = {f"{system}{seed}": {"train": {"val_rsum": curve[system][seed]}} for system in curve for seed in range(3)}
    curves = collect_curves(cells, records)
    assert sorted(curves) == ["dive", "vsepp"] and curves["dive"][2] == [62.0, 102.0, 121.0, 123.0]
    summary = plateau_summary(curves, command="python -m stages.study --grid plateau", git="abc1234", date="today")
    assert summary["recommended_epochs"] == 3  # dive: 3 (120 within 1% of 121), vsepp: 2
    assert summary["systems"]["vsepp"]["epoch"] == 2 and summary["systems"]["dive"]["mean"][0] == 61.0
    text = "\n".join(section_plateau(summary, "plateau/val_rsum_curve.png"))
    assert "**3 epochs**" in text and "![validation RSUM per epoch](plateau/val_rsum_curve.png)" in text
    assert "| 3 | **121.0 ± 1.0** | 81.5 ± 1.0 |" in text  # the table bolds each system's plateau epoch
    assert summary["systems"]["dive"]["per_seed"]["2"] == [62.0, 102.0, 121.0, 123.0]
    same = "\n".join(
        section_training_length(summary, 3, "set from docs/plateau.json", check_cells(summary, {}), "p.json")
    )
    assert "`python -m stages.study --grid plateau` at git `abc1234`" in same and "the same count" in same
    assert "No check of the cells against the curve" in same
    other = "\n".join(section_training_length(summary, 5, "earlier budget", None, "p.json"))
    assert "more than its plateau epoch (3)" in other
    # a 2-epoch schedule whose cells end at the curve's level (its annealing catches up): trained to the plateau
    reached = "\n".join(
        section_training_length(
            summary, 2, "the budget's", check_cells(summary, {0: 121.0, 1: 122.5, 2: 122.0}), "p.json"
        )
    )
    assert "fewer than its plateau epoch (3)" in reached and "**the cells are trained to the plateau**" in reached
    assert "best validation RSUM of 121.8 ± 0.8 over 3 seeds" in reached and "best epoch mean of 121.8" in reached
    # cells that stop where the long curve was after epoch 2: every seed gains ~20 later, so not trained to it
    short = "\n".join(
        section_training_length(
            summary, 2, "the budget's", check_cells(summary, {0: 100.0, 1: 101.0, 2: 102.0}), "p.json"
        )
    )
    assert "**the cells are not trained to the plateau**" in short and "its epoch 4 minus the cells" in short
    missing = "\n".join(section_training_length(None, 5, "earlier budget", None, "docs/plateau.json"))
    assert "No validation curve has been measured yet" in missing and "--grid plateau" in missing


def test_reaches_plateau_pairs_the_short_schedule_with_every_epoch_of_the_curve() -> None:
    curve = {0: [50.0, 100.0, 110.0], 1: [52.0, 103.0, 112.0], 2: [49.0, 99.0, 111.0]}
    level = reaches_plateau(curve, {0: 110.5, 1: 111.0, 2: 110.0})
    assert level.reached and level.gain_epoch == 3 and level.best_mean == pytest.approx(111.0)
    # within 1% of the best epoch (110.45 vs 111.0), but every seed's epoch 3 beats it by 0.50-0.60: the paired
    # interval excludes 0
    beaten = reaches_plateau(curve, {0: 109.5, 1: 111.4, 2: 110.45})
    assert not beaten.reached and beaten.gain is not None and beaten.gain.low > 0
    # far below on average, though one seed is above: (a) fails
    assert not reaches_plateau(curve, {0: 80.0, 1: 115.0, 2: 70.0}).reached
    # above the curve: reached, the gain negative
    above = reaches_plateau(curve, {0: 120.0, 1: 121.0, 2: 119.0})
    assert above.reached and above.gain.mean < 0
    # one seed: no interval, only (a)
    assert reaches_plateau({0: [50.0, 100.0]}, {0: 99.5}).reached
    assert not reaches_plateau({0: [50.0, 100.0]}, {0: 95.0}).reached
    # no cells: not reached, nothing to compare
    assert not reaches_plateau(curve, {}).reached
