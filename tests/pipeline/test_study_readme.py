"""pipeline/study_readme.py: the README's study summary is computed from the study's numbers and replaces only its
block; pipeline/study.py's run log keeps the wall time of the invocations that trained the cells."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.study import Cell, RunLog, Variant, runs_that_trained
from pipeline.study_plateau import reaches_plateau
from pipeline.study_readme import BEGIN, END, replace_block, summary_block, update_readme

SEEDS = (0, 1, 2)
DIVE = {0: 150.0, 1: 146.0, 2: 152.0}
VSEPP = {0: 110.0, 1: 108.0, 2: 113.0}  # DivE - VSE++ = 40, 38, 39: an interval far above 0


def _study(extra: dict[str, dict[int, float]] | None = None) -> tuple[list[Cell], dict[str, dict]]:
    cells, records = [], {}
    for label, values in {"dive": DIVE, "vsepp": VSEPP, **(extra or {})}.items():
        for seed in SEEDS:
            fp = f"{label}-{seed}"
            cells.append(Cell("main", label, {}, seed=seed, fingerprint=fp))
            records[fp] = {"train": {}, "variants": {Variant().key: {"metrics": {"full": {"rsum": values[seed]}}}}}
    return cells, records


RUN = {"command": "python -m stages.study --grid all", "sha": "abc1234", "started": "2026-12-01T15:00:00+00:00",
       "workers": 2, "load": 0.4, "wall_seconds": 4800.0}  # fmt: skip


def test_summary_is_computed_from_the_numbers() -> None:
    cells, records = _study()
    block = summary_block(cells, records, [RUN], epochs=6, seeds=3, report="docs/results.md")
    assert "6 distinct cells, 3 seeds each, 6 epochs per cell" in block
    assert "`abc1234`" in block and "**80.0 minutes**" in block and "2026-12-01" in block
    assert "| dive | 149.3 ± 3.1 | 3 |" in block and "| vsepp | 110.3 ± 2.5 | 3 |" in block
    assert "2 of 2 checked claims hold, 0 do not, 0 are inconclusive" in block
    assert "- *holds* (2):\n  - DivE retrieves better than every compared system" in block
    assert "— Δ +39.0 ± 2.5" in block  # the paired per-seed difference and its 95% half-width
    # the same study with VSE++ ahead on every seed flips the verdict; nothing in the block is fixed text
    records_flipped = {fp: r for fp, r in records.items()}
    for seed in SEEDS:
        records_flipped[f"vsepp-{seed}"] = {
            "train": {}, "variants": {Variant().key: {"metrics": {"full": {"rsum": DIVE[seed] + 20.0 + seed}}}}
        }  # fmt: skip
    flipped = summary_block(cells, records_flipped, [RUN], epochs=6, seeds=3, report="docs/results.md")
    assert "0 of 2 checked claims hold, 2 do not" in flipped and "- *does not hold* (2):\n  - DivE" in flipped


def test_summary_states_a_resumed_run_and_a_missing_log() -> None:
    cells, records = _study()
    resumed = summary_block(cells, records, [RUN, {**RUN, "wall_seconds": 600.0}], epochs=6, seeds=3, report="r.md")
    assert "**90.0 minutes** over 2 invocations (resumed from the cache)" in resumed
    assert "wall time unknown" in summary_block(cells, records, [], epochs=6, seeds=3, report="r.md")


def test_summary_states_the_computed_training_length_check() -> None:
    cells, records = _study()
    curve = {0: [100.0, 140.0, 150.0], 1: [98.0, 141.0, 152.0], 2: [101.0, 139.0, 151.0]}
    reached = summary_block(cells, records, [RUN], epochs=2, seeds=3, report="r.md",
                            plateau=reaches_plateau(curve, {0: 150.5, 1: 151.0, 2: 150.0}))  # fmt: skip
    assert (
        "validation curve of `--grid plateau`: the main grid's DivE reaches a best validation RSUM of 150.5" in reached
    )
    assert "**the cells are trained to the plateau**" in reached
    short = summary_block(cells, records, [RUN], epochs=2, seeds=3, report="r.md",
                          plateau=reaches_plateau(curve, {0: 139.0, 1: 140.0, 2: 138.5}))  # fmt: skip
    assert (
        "**the cells are not trained to the plateau**" in short
        and "its epoch 3 minus the cells: Δ +11.8 ± 1.9" in short
    )
    assert "not checked against a validation curve" in summary_block(cells, records, [RUN], epochs=2, seeds=3,
                                                                     report="r.md")  # fmt: skip


def test_replace_block_keeps_the_rest_byte_for_byte(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    text = f"# Title\n\nbefore  \n{BEGIN}\nold summary\n{END}\nafter\r\n"
    readme.write_bytes(text.encode())
    update_readme(readme, "new\nsummary")
    assert readme.read_bytes().decode() == f"# Title\n\nbefore  \n{BEGIN}\nnew\nsummary\n{END}\nafter\r\n"
    update_readme(readme, "new\nsummary")  # idempotent
    assert readme.read_text().count("new\nsummary") == 1
    for broken in ("no markers", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n"):
        with pytest.raises(ValueError, match="study-summary"):
            replace_block(broken, "x")


def test_run_log_finds_the_invocations_that_trained_the_cells(tmp_path: Path) -> None:
    header = {k: v for k, v in RUN.items() if k != "wall_seconds"}
    first = RunLog(tmp_path, start=time.perf_counter() - 100.0, **header)  # began 100 s ago
    first.trained("a")
    first.trained("b")
    second = RunLog(tmp_path, **header)
    second.trained("c")
    with (tmp_path / "runs.jsonl").open("a") as f:
        f.write(f'{{"run": "{second.id}", "trained": "a", "seconds": 99')  # killed mid-write: not counted
    killed = RunLog(tmp_path, **header)  # killed before it finished a cell: trained nothing
    after = RunLog(tmp_path, **header)  # the next run's lines are not glued to the cut one
    after.trained("d")
    runs = runs_that_trained(tmp_path, ["a", "c"])
    assert [r["trained"] for r in runs] == [["a", "b"], ["c"]] and runs[0]["command"] == RUN["command"]
    assert 100.0 <= runs[0]["wall_seconds"] < 110.0 and runs[1]["wall_seconds"] < 10.0  # up to its last cell
    assert [r["run"] for r in runs_that_trained(tmp_path, ["b"])] == [first.id]
    assert killed.id not in {r["run"] for r in runs_that_trained(tmp_path, ["a", "b", "c"])}
    assert [r["run"] for r in runs_that_trained(tmp_path, ["d"])] == [after.id]
    assert runs_that_trained(tmp_path, ["z"]) == [] and runs_that_trained(tmp_path / "none", ["a"]) == []
