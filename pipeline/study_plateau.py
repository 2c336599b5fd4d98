"""How long the study trains: validation-RSUM curves over seeds (``--grid plateau``) and the plateau epoch they give.

``python -m stages.study --grid plateau`` trains the study base (DivE) and VSE++ for ``plateau_epochs`` epochs over
the study's seeds; every cell records its validation RSUM after each epoch (``record["train"]["val_rsum"]``, from the
training history). ``plateau_epoch`` reads the epoch count from those numbers (the rule is its docstring), the run
writes the curve (mean ± std over seeds per epoch) as a PNG and a table into its report and a summary JSON
(``docs/plateau.json``), and the full study's report quotes that summary next to the epochs it trained with, so
docs/results.md always says which run its epoch count came from.

The learning-rate schedule (warm-up + cosine, M§5) spans the run's own ``epochs``, so the curve is that of a
``plateau_epochs``-long schedule, and a cell trained for fewer epochs anneals its rate sooner and ends higher than the
curve at the same epoch. So the full study does not trust the curve's plateau epoch alone: ``reaches_plateau`` applies
the same rule to its own cells (the main grid's DivE, best validation RSUM per seed) against every epoch of the curve,
paired by seed, and the report states the computed answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.study import Cell
from pipeline.study_stats import HOLDS, Paired, Stat, paired, stat

PLATEAU_TOLERANCE = 0.01  # (a) of the rule: within 1% of the best mean validation RSUM
PLATEAU_RULE = (
    "the plateau epoch is the first epoch e whose mean validation RSUM over seeds is within "
    "{tolerance:.0%} of the best epoch's mean and after which no later epoch is better by a paired 95% CI over the "
    "seeds (the per-seed gain of epoch e' over epoch e has an interval above 0); with one seed only the first part "
    "applies"
)
PLATEAU_SUMMARY = "plateau.json"  # beside the reports: the plateau run writes it, the full study quotes it
Curves = dict[str, dict[int, list[float]]]  # system -> seed -> val RSUM after epochs 1..E


@dataclass(frozen=True)
class Plateau:
    """The plateau of one system's curve. Epochs count from 1 (``epoch`` = how many epochs to train)."""

    system: str
    epoch: int
    best_epoch: int
    best_mean: float
    plateau_mean: float
    seeds: int
    epochs: int


def _at(per_seed: Mapping[int, Sequence[float | None]], epoch: int) -> dict[int, float]:
    """``{seed: val RSUM after ``epoch`` (1-based)}`` over the seeds whose curve reaches it."""
    out = {}
    for seed, curve in per_seed.items():
        if len(curve) >= epoch and curve[epoch - 1] is not None and math.isfinite(curve[epoch - 1]):
            out[seed] = float(curve[epoch - 1])
    return out


def curve_stats(per_seed: Mapping[int, Sequence[float | None]]) -> list[Stat | None]:
    """Mean ± std over seeds after each epoch 1..E."""
    epochs = max((len(c) for c in per_seed.values()), default=0)
    return [stat(list(_at(per_seed, e).values())) for e in range(1, epochs + 1)]


def plateau_epoch(
    system: str, per_seed: Mapping[int, Sequence[float | None]], tolerance: float = PLATEAU_TOLERANCE
) -> Plateau:
    """The first epoch e (1-based) such that

    (a) ``mean_e >= best − tolerance · |best|``, ``best`` the highest mean validation RSUM of any epoch, and
    (b) no later epoch e' is better: the paired difference ``v_e' − v_e`` over the seeds both have does not have a
        95% t interval above 0 (``pipeline.study_stats.paired``; with one seed no interval, so only (a) applies).

    The best epoch always satisfies (a), and (b) as well when every epoch has the same seeds.

    Raises:
        ValueError: no finite value in the curve.
    """
    means = [s.mean if s is not None else -math.inf for s in curve_stats(per_seed)]
    if not means or max(means) == -math.inf:
        raise ValueError(f"no validation RSUM in the curve of {system!r}")
    best = max(means)
    best_epoch = means.index(best) + 1
    chosen = best_epoch
    for e in range(1, len(means) + 1):
        if means[e - 1] < best - tolerance * abs(best):
            continue
        here = _at(per_seed, e)
        if all(paired(_at(per_seed, later), here).status != HOLDS for later in range(e + 1, len(means) + 1)):
            chosen = e
            break
    seeds = sum(1 for c in per_seed.values() if any(v is not None for v in c))
    return Plateau(system, chosen, best_epoch, best, means[chosen - 1], seeds, len(means))


def collect_curves(cells: Sequence[Cell], records: Mapping[str, Mapping[str, Any] | None]) -> Curves:
    """``{system: {seed: val RSUM per epoch}}`` of the plateau grid's cells (``records``: fingerprint -> record)."""
    out: Curves = {}
    for cell in cells:
        if cell.grid != "plateau":
            continue
        curve = ((records.get(cell.fingerprint) or {}).get("train") or {}).get("val_rsum")
        if curve:
            out.setdefault(cell.label, {})[cell.seed] = [None if v is None else float(v) for v in curve]
    return out


def plot_curves(curves: Curves, plateaus: Mapping[str, Plateau], path: Path) -> Path:
    """Validation RSUM after each epoch (mean ± std over seeds, one line per system), plateau epochs marked; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    for (system, per_seed), color in zip(sorted(curves.items()), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        points = [(e, s) for e, s in enumerate(curve_stats(per_seed), start=1) if s is not None]
        xs, ms = [e for e, _ in points], [s.mean for _, s in points]
        sd = [s.std or 0.0 for _, s in points]
        ax.plot(xs, ms, marker="o", markersize=3, color=color, label=f"{system} ({plateaus[system].seeds} seeds)")
        ax.fill_between(xs, [m - d for m, d in zip(ms, sd, strict=True)], [m + d for m, d in zip(ms, sd, strict=True)],
                        color=color, alpha=0.2)  # fmt: skip
        ax.axvline(plateaus[system].epoch, color=color, linestyle="--", linewidth=1)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("validation RSUM")
    ax.set_title("Validation RSUM per epoch (mean ± std over seeds); dashed: plateau")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class ScheduleCheck:
    """Whether cells trained on a shorter schedule reach the plateau of the long curve (``reaches_plateau``)."""

    reached: bool
    short: Stat | None  # best validation RSUM of the short-schedule cells, over seeds
    best_mean: float  # the highest mean of the long curve's epochs
    gain: Paired | None  # the long curve's best epoch minus the short cells, paired by seed
    gain_epoch: int | None
    curve_epochs: int

    def describe(self) -> str:
        """One sentence: the numbers and the computed answer (report and README)."""
        short = f"{self.short.format()} over {self.short.n} seeds" if self.short else "no value"
        gain = "" if self.gain is None else f"; its epoch {self.gain_epoch} minus the cells: {self.gain.format()}"
        answer = f"**the cells are {'' if self.reached else 'not '}trained to the plateau**"
        return (
            f"the main grid's DivE reaches a best validation RSUM of {short}, against a best epoch mean of "
            f"{self.best_mean:.1f} on the {self.curve_epochs}-epoch curve{gain}, paired by seed: {answer}"
        )


def reaches_plateau(
    curve: Mapping[int, Sequence[float | None]], short: Mapping[int, float], tolerance: float = PLATEAU_TOLERANCE
) -> ScheduleCheck:
    """The plateau rule of ``plateau_epoch`` applied to cells trained on their own, shorter schedule: they reach the
    plateau when

    (a) their mean best validation RSUM is within ``tolerance`` of the long curve's best epoch mean (or above it), and
    (b) no epoch of the long curve beats them: ``v_e − v_short`` paired by seed has no 95% t interval above 0.

    ``curve``: ``{seed: val RSUM after epochs 1..E}`` of the long schedule; ``short``: ``{seed: best val RSUM}`` of the
    cells (e.g. the main grid's DivE). A short schedule anneals its learning rate sooner than the long curve at the
    same epoch, so this, not the curve's own plateau epoch, says whether the study's cells are trained long enough.
    """
    means = [s.mean if s is not None else -math.inf for s in curve_stats(curve)]
    short_stat = stat([v for v in short.values() if math.isfinite(v)])
    if short_stat is None or not means:
        return ScheduleCheck(False, short_stat, max(means, default=-math.inf), None, None, len(means))
    # the cells as epoch 1 in front of the curve: they reach the plateau when the rule picks that epoch
    seeds = set(curve) | set(short)
    ahead = {seed: [short.get(seed), *curve.get(seed, ())] for seed in seeds}
    reached = plateau_epoch("cells", ahead, tolerance).epoch == 1
    gains = {e: paired(_at(curve, e), short) for e in range(1, len(means) + 1)}
    gain_epoch = max(gains, key=lambda e: gains[e].mean if gains[e].mean is not None else -math.inf)
    return ScheduleCheck(reached, short_stat, max(means), gains[gain_epoch], gain_epoch, len(means))


def plateaus_of(curves: Curves, tolerance: float = PLATEAU_TOLERANCE) -> dict[str, Plateau]:
    return {system: plateau_epoch(system, per_seed, tolerance) for system, per_seed in curves.items()}


def plateau_summary(
    curves: Curves, *, command: str, git: str, date: str, tolerance: float = PLATEAU_TOLERANCE
) -> dict[str, Any]:
    """What docs/plateau.json holds: the run, the rule, every system's curve statistics and plateau, and the
    recommended epochs (the largest plateau epoch over the systems)."""
    plateaus = plateaus_of(curves, tolerance)
    return {
        "command": command,
        "git": git,
        "date": date,
        "tolerance": tolerance,
        "rule": PLATEAU_RULE.format(tolerance=tolerance),
        "recommended_epochs": max((p.epoch for p in plateaus.values()), default=None),
        "systems": {
            system: {
                **asdict(plateaus[system]),
                "mean": [None if s is None else s.mean for s in curve_stats(per_seed)],
                "std": [None if s is None else s.std for s in curve_stats(per_seed)],
                "n": [0 if s is None else s.n for s in curve_stats(per_seed)],
                "per_seed": {str(seed): list(curve) for seed, curve in sorted(per_seed.items())},
            }
            for system, per_seed in sorted(curves.items())
        },
    }


def write_summary(summary: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    tmp.replace(path)


def read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _curve_table(summary: Mapping[str, Any]) -> list[str]:
    systems = sorted(summary["systems"])
    epochs = max(len(summary["systems"][s]["mean"]) for s in systems)
    header = "| epoch | " + " | ".join(f"{s} val RSUM" for s in systems) + " |"
    lines = [header, "|" + "---|" * (len(systems) + 1)]
    for e in range(epochs):
        cells = []
        for s in systems:
            entry = summary["systems"][s]
            mean, std = (entry["mean"][e], entry["std"][e]) if e < len(entry["mean"]) else (None, None)
            text = "–" if mean is None else f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}")
            cells.append(f"**{text}**" if e + 1 == entry["epoch"] else text)
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return lines


def section_plateau(summary: Mapping[str, Any], plot: str | None) -> list[str]:
    """The plateau run's report section: rule, per-system plateau, the curve (PNG and table)."""
    lines = [
        "## Validation curve and plateau epoch",
        "",
        f"Rule: {summary['rule']}. The recommended study length is the largest plateau epoch over the systems: "
        f"**{summary['recommended_epochs']} epochs**. The learning-rate schedule spans the whole run here (warm-up + "
        "cosine over all its epochs), so a cell trained for the plateau epoch anneals sooner; the full study's report "
        "checks that its cells reach the plateau value.",
        "",
    ]
    for system, entry in sorted(summary["systems"].items()):
        lines.append(
            f"- {system}: plateau after **{entry['epoch']}** of {entry['epochs']} epochs (mean val RSUM "
            f"{entry['plateau_mean']:.1f}; best {entry['best_mean']:.1f} after epoch {entry['best_epoch']}; "
            f"{entry['seeds']} seeds)."
        )
    lines.append("")
    if plot:
        lines += [f"![validation RSUM per epoch]({plot})", ""]
    return [*lines, *_curve_table(summary), "", "Bold: the plateau epoch.", ""]


def section_training_length(
    summary: Mapping[str, Any] | None, epochs: int, source: str, check: ScheduleCheck | None, summary_path: str
) -> list[str]:
    """The full study's statement of where its epoch count came from and whether its cells reach the plateau.

    ``check``: ``check_cells`` of the main grid's DivE against ``summary``'s curve (computed once by the study run,
    which states the same answer in the README), None when either is missing.
    """
    lines = ["## Training length", ""]
    if summary is None:
        return [
            *lines,
            f"Epochs per cell: **{epochs}** ({source}). No validation curve has been measured yet (no "
            f"`{summary_path}`): run `python -m stages.study --grid plateau` to measure one; the epoch count is not "
            "yet based on a plateau.",
            "",
        ]
    recommended = summary["recommended_epochs"]
    if recommended == epochs:
        match = "the same count"
    elif epochs < recommended:
        match = f"fewer than its plateau epoch ({recommended}), which is measured on the longer schedule"
    else:
        match = f"more than its plateau epoch ({recommended})"
    lines.append(
        f"Epochs per cell: **{epochs}** ({source}). The curve in `{summary_path}` was measured by "
        f"`{summary['command']}` at git `{summary['git']}` on {summary['date']}: {match}. Rule: {summary['rule']}."
    )
    if check is None:
        lines += ["", "No check of the cells against the curve: the summary has no per-seed DivE curve or the main "
                  "grid has no DivE cell."]  # fmt: skip
        return [*lines, ""]
    return [*lines, "", f"Check (the same rule on the cells' own {epochs}-epoch schedule): {check.describe()}.", ""]


def check_cells(
    summary: Mapping[str, Any] | None, main_dive: Mapping[int, float], tolerance: float = PLATEAU_TOLERANCE
) -> ScheduleCheck | None:
    """``reaches_plateau`` of the main grid's DivE cells (``{seed: best val RSUM}``) against the DivE curve of a
    plateau summary (docs/plateau.json); None when either is missing (or the summary predates per-seed curves)."""
    dive = ((summary or {}).get("systems") or {}).get("dive") or {}
    per_seed = {int(seed): curve for seed, curve in dive.get("per_seed", {}).items()}
    if not per_seed or not main_dive:
        return None
    return reaches_plateau(per_seed, main_dive, tolerance)


def main_dive_best_val(cells: Sequence[Cell], records: Mapping[str, Mapping[str, Any] | None]) -> dict[int, float]:
    """``{seed: best validation RSUM}`` of the main grid's DivE cells that trained."""
    out = {}
    for cell in cells:
        if cell.grid == "main" and cell.label == "dive":
            value = ((records.get(cell.fingerprint) or {}).get("train") or {}).get("best_val_rsum")
            if value is not None:
                out[cell.seed] = float(value)
    return out
