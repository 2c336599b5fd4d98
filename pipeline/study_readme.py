"""The README's study summary: a block between two markers that the full study rewrites from its own numbers.

``python -m stages.study --grid all`` (not ``--quick``) replaces the text between ``BEGIN`` and ``END`` in
README.md with ``summary_block``: the run that trained the cells (command, commit, wall time from the cache's run
log), the main systems' test RSUM over seeds and the verdict counts with every claim by status, all computed from
the same rows as docs/results.md, so the README never carries a hand-written verdict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.study import Cell
from pipeline.study_plateau import ScheduleCheck
from pipeline.study_verdict import aggregate, collect, seed_noise, system_order, verdict

BEGIN = "<!-- study-summary:begin (written by `python -m stages.study --grid all`; edits here are overwritten) -->"
END = "<!-- study-summary:end -->"
STATUSES = ("holds", "does not hold", "inconclusive")


def summary_block(
    cells: Sequence[Cell],
    records: Mapping[str, Mapping[str, Any] | None],
    runs: Sequence[Mapping[str, Any]],
    *,
    epochs: int,
    seeds: int,
    report: str,
    plateau: ScheduleCheck | None = None,
) -> str:
    """The markdown between the markers (markers excluded).

    Args:
        cells: the study's cells (fingerprints set, as ``pipeline.study.plan`` returns them).
        records: ``{fingerprint: record}`` of the cells.
        runs: the logged invocations that trained them (``pipeline.study.runs_that_trained``).
        epochs, seeds: the study's training length and seeds per cell.
        report: path of the full report, linked from the block.
        plateau: whether the cells reach the plateau of the validation curve (``pipeline.study_plateau.check_cells``);
            None: no curve or no DivE cell, and the block says so.
    """
    rows = collect(list(cells), dict(records))
    rsum = aggregate(rows, "rsum")
    claims = verdict(rows, seed_noise(rows))
    distinct = len({c.fingerprint for c in cells})
    if runs:
        minutes = sum(float(r["wall_seconds"]) for r in runs) / 60
        last = runs[-1]
        trained_by = (
            f"`{last['command']}` at git `{last['sha']}` ({last['started'][:10]}, {last['workers']} Ray workers, "
            f"1-min load {float(last['load']):.1f} at the start): **{minutes:.1f} minutes**"
            + (f" over {len(runs)} invocations (resumed from the cache)" if len(runs) > 1 else "")
        )
    else:
        trained_by = "cells read from a cache without a run log (wall time unknown)"
    lines = [
        f"Latest full study ({distinct} distinct cells, {seeds} seeds each, {epochs} epochs per cell), trained by "
        f"{trained_by}. Test RSUM on `shapes`, mean ± std over seeds ([{report}]({report}) has every table, the "
        "training-length curve and the evidence of each claim):",
        "",
        "| system | RSUM | seeds |",
        "|---|---|---|",
    ]
    for label in system_order(rows):
        for (grid, row_label, variant), s in sorted(rsum.items()):
            if grid == "main" and row_label == label:
                name = label if variant == "default" else f"{label} ({variant})"
                lines.append(f"| {name} | {s.format(1)} | {s.n} |")
    counts = {status: [c for c in claims if c.status == status] for status in STATUSES}
    training = (
        f"Training length, checked against the validation curve of `--grid plateau`: {plateau.describe()}."
        if plateau
        else "Training length: not checked against a validation curve (no `--grid plateau` curve with per-seed values)."
    )
    lines += [
        "",
        training,
        "",
        f"Verdict, from paired 95% t-intervals over the seeds: {len(counts['holds'])} of {len(claims)} checked claims "
        f"hold, {len(counts['does not hold'])} do not, {len(counts['inconclusive'])} are inconclusive.",
        "",
    ]
    for status in STATUSES:
        if counts[status]:
            lines.append(f"- *{status}* ({len(counts[status])}):")
            lines += [f"  - {c.claim}" + (f" — {c.delta()}" if c.delta() else "") for c in counts[status]]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between ``BEGIN`` and ``END`` replaced by ``block``.

    Raises:
        ValueError: the markers are missing, repeated or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README needs exactly one '{BEGIN}' line followed by one '{END}' line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def update_readme(path: Path, block: str) -> None:
    """Rewrite ``path``'s summary block atomically (temp file + rename); the rest of the file is kept byte for byte."""
    with path.open(newline="") as f:  # keep the file's own line endings
        text = replace_block(f.read(), block)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        f.write(text)
    tmp.replace(path)
