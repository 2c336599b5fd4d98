"""The study report (docs/results.md): Tables 1-5-shaped markdown tables next to the paper's numbers, RSUM sweep
plots, the setting, the wall time and the verdict of ``pipeline.study_verdict``.
"""

from __future__ import annotations

import json
import math
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.cli import git_sha
from pipeline.study import Cell, JobOutcome
from pipeline.study_grid import GRIDS, HEADS, SIMILARITIES, StudySettings
from pipeline.study_plateau import (
    PLATEAU_SUMMARY,
    ScheduleCheck,
    collect_curves,
    plateau_summary,
    plateaus_of,
    plot_curves,
    section_plateau,
    section_training_length,
    write_summary,
)
from pipeline.study_verdict import (
    PAPER_ELEMENTS,
    PAPER_MAIN,
    PAPER_SIMILARITY_X_HEAD,
    PAPER_SWEEPS,
    SWEEP_SYMBOL,
    Row,
    aggregate,
    by_seed,
    collect,
    is_degenerate,
    paired,
    seed_noise,
    system_order,
    verdict,
)


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _cellstat(stats: dict, key: tuple[str, str, str], digits: int = 1) -> str:
    s = stats.get(key)
    return "–" if s is None else s.format(digits)


def _seeds(stats: dict, key: tuple[str, str, str]) -> str:
    s = stats.get(key)
    return "0" if s is None else str(s.n)


TIED = " ‡"
TIED_NOTE = (
    "‡ the scores of this row are (almost) all tied (fewer than half distinct): its recall is an artefact of the "
    "recall tie rule (ties favour the query), not a measurement, and it is left out of the verdict."
)


def _tied(rows: list[Row]) -> set[tuple[str, str, str]]:
    return {(r.grid, r.label, r.variant) for r in rows if is_degenerate(r)}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def plot_sweep(rows: list[Row], grid: str, path: Path) -> Path | None:
    """RSUM vs the swept value (ours, mean ± std over seeds) next to the paper's F30K curve (right axis); PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rsum = aggregate(rows, "rsum")
    points = sorted({(r.x, r.label) for r in rows if r.grid == grid and r.variant == "default"})
    points = [(x, rsum[(grid, label, "default")]) for x, label in points if (grid, label, "default") in rsum]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=110)
    xs = [float(x) for x, _ in points]
    ax.errorbar(
        xs,
        [s.mean for _, s in points],
        yerr=[s.std or 0.0 for _, s in points],
        marker="o",
        capsize=3,
        color="tab:blue",
        label="ours (shapes, test)",
    )
    ax.set_xlabel(SWEEP_SYMBOL[grid])
    ax.set_ylabel("RSUM (ours)", color="tab:blue")
    paper = PAPER_SWEEPS[grid]
    twin = ax.twinx()
    twin.plot(
        [float(x) for x in paper],
        list(paper.values()),
        marker="s",
        linestyle="--",
        color="tab:gray",
        label="paper (F30K, ROI)",
    )
    twin.set_ylabel("RSUM (paper)", color="tab:gray")
    if grid == "alpha":
        ax.set_xscale("log", base=2)
    ax.set_title(f"RSUM vs {SWEEP_SYMBOL[grid]}")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


MAIN_COLUMNS = (  # (header, metric, digits)
    ("RSUM", "rsum", 1), ("i2t R@1", "i2t_r1", 1), ("t2i R@1", "t2i_r1", 1), ("t2i R-P", "t2i_r_precision", 1),
    ("t2i mAP@R", "t2i_map_at_r", 1), ("ln CV img", "log_cv_image", 2), ("ln CV txt", "log_cv_text", 2),
    ("train s", "train_seconds", 0),
)  # fmt: skip


def _section_main(rows: list[Row], grid: str = "main") -> list[str]:
    stats, tied = {m: aggregate(rows, m) for _, m, _ in MAIN_COLUMNS}, _tied(rows)
    labels = system_order(rows, grid)
    order = sorted({(r.label, r.variant) for r in rows if r.grid == grid},
                   key=lambda lv: (labels.index(lv[0]), lv[1] != "default"))  # fmt: skip
    body = []
    for label, variant in order:
        key = (grid, label, variant)
        f30k, coco = PAPER_MAIN.get(label, (None, None)) if variant == "default" else (None, None)
        columns = [_cellstat(stats[m], key, digits) for _, m, digits in MAIN_COLUMNS]
        columns[0] += TIED if key in tied else ""
        n = stats["rsum"][key].n if key in stats["rsum"] else 0
        name = label if variant == "default" else f"{label} ({variant})"
        body.append([name, str(n), *columns, _num(f30k), _num(coco)])
    header = ["system", "seeds", *(h for h, _, _ in MAIN_COLUMNS), "paper F30K RSUM", "paper COCO 1K RSUM"]
    return [
        "## Compared systems (paper Tables 1-2)",
        "",
        "Each system is its profile (`profiles/<name>.yaml`) over the study base. PCME variants evaluate the same "
        "model: `mean_samples` = mean cosine over its J × J samples, `mu_only` = its means only. R-P / mAP@R use the "
        "exhaustive relevance of the shapes test split (captions as queries). ln CV is −∞ (shown –) for one-element "
        "sets (VSE++). Paper: ResNet-152 + bi-GRU (F30K Table 2, COCO 1K Table 1); MaxMatch has no verified paper "
        "numbers, PCME++ none in this protocol (it reports CLIP backbones).",
        "",
        *_table(header, body),
        "",
        *([TIED_NOTE, ""] if any(TIED in row[2] for row in body) else []),
    ]


def _section_similarity_x_head(rows: list[Row]) -> list[str]:
    stats, tied = {m: aggregate(rows, m) for m in ("rsum", "log_cv_image", "log_cv_text")}, _tied(rows)
    pairs = sorted(
        {(r.tags["similarity"], r.tags["head"], r.label) for r in rows if r.grid == "similarity_x_head"},
        key=lambda p: (SIMILARITIES.index(p[0]), HEADS.index(p[1])),
    )
    body = []
    for similarity, head, label in pairs:
        key = ("similarity_x_head", label, "default")
        paper_rsum, paper_cv = PAPER_SIMILARITY_X_HEAD.get((similarity, head), (None, None))
        body.append(
            [
                similarity,
                head,
                _seeds(stats["rsum"], key),
                _cellstat(stats["rsum"], key) + (TIED if key in tied else ""),
                _cellstat(stats["log_cv_image"], key, 2),
                _cellstat(stats["log_cv_text"], key, 2),
                _num(paper_rsum),
                _num(paper_cv, 2),
            ]
        )
    header = ["similarity", "head", "seeds", "RSUM", "ln CV img", "ln CV txt", "paper RSUM", "paper ln CV"]
    return [
        "## Similarity × head (paper Table 3)",
        "",
        "DivE loss (triplet + diversity + MMD) and K = 4 throughout; `slot` = DivE's SPM, `transformer` = the same "
        "block with softmax over inputs, `pienet` = PVSE's head. ln CV = log of the mean circular variance of the "
        "test sets (higher = more diverse elements). Paper: F30K, BUTD ROI + bi-GRU.",
        "",
        *_table(header, body),
        "",
        *([TIED_NOTE, ""] if any(TIED in row[3] for row in body) else []),
    ]


def _section_sweeps(rows: list[Row], plots: dict[str, Path], out_dir: Path) -> list[str]:
    if not any(r.grid in ("k", "t", "alpha") for r in rows):
        return []
    lines = [
        "## K, T and α (paper Table 4)",
        "",
        "DivE with one value changed; plots: ours (left axis) and the paper's F30K curve (right axis).",
        "",
    ]
    stats, tied = {m: aggregate(rows, m) for m in ("rsum", "log_cv_image", "log_cv_text")}, _tied(rows)
    for grid in ("k", "t", "alpha"):
        points = sorted({(r.x, r.label) for r in rows if r.grid == grid})
        if not points:
            continue
        body = [
            [
                f"{x:g}",
                _seeds(stats["rsum"], (grid, label, "default")),
                _cellstat(stats["rsum"], (grid, label, "default")) + (TIED if (grid, label, "default") in tied else ""),
                _cellstat(stats["log_cv_image"], (grid, label, "default"), 2),
                _cellstat(stats["log_cv_text"], (grid, label, "default"), 2),
                _num(PAPER_SWEEPS[grid].get(x)),
            ]
            for x, label in points
        ]
        lines += _table([SWEEP_SYMBOL[grid], "seeds", "RSUM", "ln CV img", "ln CV txt", "paper RSUM"], body) + [""]
        lines += [TIED_NOTE, ""] if any(TIED in row[2] for row in body) else []
        if grid in plots:
            lines += [f"![RSUM vs {SWEEP_SYMBOL[grid]}]({os.path.relpath(plots[grid], out_dir)})", ""]
    return lines


def _section_elements(rows: list[Row]) -> list[str]:
    element_rows = [r for r in rows if r.grid == "elements"]
    if not element_rows:
        return []
    stats, values, tied = aggregate(element_rows, "rsum"), by_seed(element_rows, "rsum"), _tied(element_rows)
    variants = list(dict.fromkeys(r.variant for r in element_rows))  # the grid's order
    label = element_rows[0].label
    full = values.get(("elements", label, "all"), {})
    body = []
    for variant in variants:
        key = ("elements", label, variant)
        side, _, rest = variant.partition("_")
        kind, _, index = rest.partition("_")
        what = "all elements" if variant == "all" else f"{side}: {'only' if kind == 'only' else 'all but'} {index}"
        delta = "–" if variant == "all" else paired(values.get(key, {}), full).format().removeprefix("Δ ")
        body.append(
            [
                what,
                _seeds(stats, key),
                _cellstat(stats, key) + (TIED if key in tied else ""),
                delta,
                _num(PAPER_ELEMENTS.get(variant)),
            ]
        )
    return [
        "## Evaluating with a subset of the set (paper Table 5)",
        "",
        "The main DivE model of each seed scored with smooth-Chamfer on a subset of its image (or text) set elements; "
        "RSUM is mean ± std over seeds, Δ vs all the paired difference with its 95% CI. Element indices are 0-based "
        "here and 1-based in the paper (ours `1` = the paper's (2)); which slot learns what is arbitrary (and differs "
        "between seeds), so compare the spread, not the row. Paper: F30K, only {1,3,4} is given for all-but-one.",
        "",
        *_table(["evaluated with", "seeds", "RSUM", "Δ vs all", "paper RSUM"], body),
        "",
        *([TIED_NOTE, ""] if any(TIED in row[2] for row in body) else []),
    ]


def _section_plateau_run(
    cells: list[Cell], records: dict, out: Path, command: str, runs: list[dict[str, Any]] | None = None
) -> list[str]:
    """The plateau run's curve (PNG + table) and rule; writes the summary the full study quotes (out.json).

    The summary names the run that trained the cells (the last of ``runs``, from the cache's run log), not this
    rendering, so a report regenerated from the cache keeps the commit and date of the measurement.
    """
    curves = collect_curves(cells, records)
    if not curves:
        return ["## Validation curve and plateau epoch", "", "No cell recorded a validation curve.", ""]
    if runs:
        command, git, date = runs[-1]["command"], runs[-1]["sha"], runs[-1]["started"].replace("T", " ")[:16] + " UTC"
    else:
        git, date = git_sha(), f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    summary = plateau_summary(curves, command=command, git=git, date=date)
    plot = plot_curves(curves, plateaus_of(curves), out.parent / out.stem / "val_rsum_curve.png")
    write_summary(summary, out.with_suffix(".json"))
    return section_plateau(summary, os.path.relpath(plot, out.parent))


def render_report(
    cells: list[Cell],
    outcomes: list[JobOutcome],
    *,
    out: Path,
    grids: list[str],
    settings: StudySettings,
    quick: bool,
    workers: int,
    wall_seconds: float,
    base: dict[str, Any],
    estimate: dict[str, float] | None,
    command: str,
    load: float = 0.0,
    runs: list[dict[str, Any]] | None = None,
    curve_summary: dict[str, Any] | None = None,
    plateau: ScheduleCheck | None = None,
) -> str:
    """docs/results.md: setting, wall time, Tables 3-5-shaped tables with the paper's numbers, plots, verdict.

    ``curve_summary`` / ``plateau``: the validation curve the cells are checked against (docs/plateau.json) and the
    check (``pipeline.study_plateau.check_cells``), for the "Training length" section.
    """
    records = {o.job.fingerprint: o.record for o in outcomes}
    rows = collect(cells, records)
    plots = {
        g: p
        for g in ("k", "t", "alpha")
        if (p := plot_sweep(rows, g, out.parent / out.stem / f"rsum_vs_{g}.png")) is not None
    }
    noise = seed_noise(rows)
    model, loss = base["train"]["model"], base["train"]["loss"]["kwargs"]
    ran = [o for o in outcomes if not o.cached and o.error is None]
    failed = [o for o in outcomes if o.error]
    train_seconds = [o.record["train"]["seconds"] for o in outcomes if o.record and "train" in o.record]
    title = "Study results — QUICK RUN (smoke-sized, not the full study)" if quick else "Study results"
    if grids == ["plateau"]:
        title = "Study training length: validation curve" + (" — QUICK RUN" if quick else "")
    lines = [
        f"# {title}",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, git `{git_sha()}`, host "
        f"`{socket.gethostname()}` ({os.cpu_count()} cores, 1-min load average {load:.1f} at the start), "
        f"{workers or 'no'} Ray workers. Regenerate with the same command; finished cells are read from the cache "
        "(`artifacts/study/`).",
        "",
    ]
    if quick:
        lines += [
            f"> **Quick run:** {settings.epochs} epochs of at most {settings.limit_batches} batches per cell, reduced "
            "grids. The models are barely trained, so the numbers below check that every system, ablation and "
            "table runs end to end; they are NOT evidence for or against the paper. Run `python -m stages.study "
            "--grid all` for the full study.",
            "",
        ]
    lines += [
        "## Setting",
        "",
        f"- Data: the embedded `shapes` benchmark, features `{base['paths']['features']}` "
        f"({base['extract']['image_backbone']} + {base['extract']['text_backbone']}, frozen); trained on `train`, "
        f"model selection on `val`, reported on `{base['evaluate']['split']}`.",
        f"- Base model (DivE): D = {model['embed_dim']}, K = {model['num_embeddings']}, head `{model['head']}` "
        f"{json.dumps(model['head_kwargs'])}, similarity `{loss.get('similarity')}` "
        f"{json.dumps(loss.get('similarity_kwargs', {}))}.",
        f"- Training per cell: {settings.plateau_epochs if grids == ['plateau'] else settings.epochs} epochs"
        + (f" of at most {settings.limit_batches} batches" if settings.limit_batches else "")
        + f", {base['train']['images_per_batch']} images per batch, local mode (one thread per cell); "
        f"seeds {', '.join(str(s) for s in range(settings.seeds))} for every cell of every grid (a cell's seed fixes "
        "its initialisation and batch order, so cells with the same seed are paired).",
        "- Tables: mean ± std over seeds. Seed noise: "
        + (
            f"pooled seed std of the main systems, σ = {_num(noise)} RSUM (the margin of the Table 5 all-but-one "
            "claim)."
            if noise is not None
            else "none (no system of the main grid ran two seeds)."
        ),
        "- Paper numbers (METHOD §7) come from F30K / COCO with BUTD or ResNet features and D = 1024: compare "
        "orderings and gaps, not absolute values.",
        "",
        "## Wall time",
        "",
        f"- This invocation: {wall_seconds / 60:.1f} min for {len(ran)} trained/evaluated cells "
        f"({sum(o.cached for o in outcomes)} read from the cache, {len(failed)} failed), grids: {', '.join(grids)}.",
    ]
    for run in runs or []:
        lines.append(
            f"- Trained the cells of this report: `{run['command']}` at git `{run['sha']}`, started {run['started']} "
            f"(1-min load {float(run['load']):.1f}): {float(run['wall_seconds']) / 60:.1f} min for "
            f"{len(run['trained'])} cells (from the cache's run log, `runs.jsonl`)."
        )
    if train_seconds:
        lines.append(
            f"- Training per cell: mean {sum(train_seconds) / len(train_seconds):.0f} s, max "
            f"{max(train_seconds):.0f} s (one thread; includes start-up and per-epoch validation)."
        )
    if estimate:
        lines.append(
            f"- Estimated default study (`--grid all`, {estimate['cells']:.0f} distinct cells over "
            f"{estimate['seeds']:.0f} seeds, {estimate['epochs']:.0f} epochs of {estimate['steps_per_epoch']:.0f} "
            f"batches, {estimate['workers']:.0f} worker(s)): ~{estimate['minutes']:.0f} min "
            f"({estimate['fixed_minutes']:.0f} min of evaluation + {estimate['minutes_per_epoch']:.1f} min per epoch), "
            "from this run's seconds per batch of each cell's kind (mean "
            f"{estimate['seconds_per_step']:.2f} s over the default cells) and {estimate['overhead_seconds']:.0f} s "
            "per-cell overhead (validation, start-up, one evaluation); timings from a shared machine (see the load "
            "average above) overestimate an idle one."
        )
    lines.append("")
    if any(g in GRIDS for g in grids):
        lines += section_training_length(
            curve_summary, settings.epochs, settings.epochs_source, plateau, str(out.parent / PLATEAU_SUMMARY)
        )
    if failed:
        lines += ["## Failed cells", ""] + [f"- `{o.job.labels[0]}`: {o.error}" for o in failed] + [""]
    for grid in ("main", "smoke"):
        if grid in grids:
            lines += _section_main(rows, grid)
    if "similarity_x_head" in grids:
        lines += _section_similarity_x_head(rows)
    lines += _section_sweeps(rows, plots, out.parent)
    lines += _section_elements(rows)
    if "plateau" in grids:
        lines += _section_plateau_run(cells, records, out, command, runs)
    if not any(g in grids for g in (*GRIDS, "smoke")):
        return "\n".join(lines)
    claims = verdict(rows, noise)
    lines += ["## Verdict", ""]
    excluded = sorted(
        {
            f"{r.grid}:{r.label}" + ("" if r.variant == "default" else f" ({r.variant})")
            for r in rows
            if is_degenerate(r)
        }
    )
    if excluded:
        lines += [f"Left out (tied scores ‡): {', '.join(excluded)}.", ""]
    if quick:
        lines += ["Generated from the quick run's numbers, so mostly noise; the statuses only show the machinery.", ""]
    lines.append(
        "Each claim is read from paired comparisons: two cells that ran the same seed differ only in what the grid "
        "changes, so Δ is the mean over the shared seeds of the per-seed difference (ours − the rival, in the paper's "
        "direction), with its 95% Student-t interval (± half-width). *holds* = the interval excludes 0 in the paper's "
        "direction, *does not hold* = it excludes 0 the other way, *inconclusive* = it contains 0, or fewer than two "
        'shared seeds (one seed: no interval). "Best of a sweep" is judged against the runner-up (holds when the '
        "paper's value has the best mean and its interval against the next one excludes 0; does not hold when another "
        "value beats it with an interval excluding 0). The CI column is the deciding comparison; the evidence lists "
        "all of them (RSUM unless the claim is about ln CV)."
    )
    lines.append("")
    if not claims:
        lines.append("No claim could be checked (no grid with the needed cells ran).")
    else:
        lines += _table(
            ["status", "source", "claim", "Δ (95% CI)", "seeds", "evidence"],
            [
                [
                    f"**{c.status}**",
                    c.source,
                    c.claim,
                    c.delta() or ("–" if c.diff is None else c.diff.format()),
                    "–" if c.diff is None else str(c.diff.n),
                    c.evidence.replace("|", "/"),
                ]
                for c in claims
            ],
        )
    held = sum(c.status == "holds" for c in claims)
    lines += [
        "",
        f"Summary: {held} of {len(claims)} checked claims hold, "
        f"{sum(c.status == 'does not hold' for c in claims)} do not, "
        f"{sum(c.status == 'inconclusive' for c in claims)} are inconclusive.",
        "",
    ]
    return "\n".join(lines)
