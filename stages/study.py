"""Reproduce the paper's comparisons and ablations on the embedded benchmark; write docs/results.md.

``python -m stages.study --grid main|similarity_x_head|k|t|alpha|elements|all [--quick] [--seeds N] [--workers N]``

Every grid starts from params.yaml (the embedded default) with the study settings applied (local-mode training,
``epochs``, test-split embedding without attention maps) and reuses ONE feature store (``paths.features``, extracted
first when absent). Each cell trains with ``run_training`` in local mode (one thread), then embeds the test split and
evaluates every variant; cells run in parallel as Ray tasks (one CPU each, ``--workers`` at a time, default one per
core). Results are cached per cell in ``artifacts/study/<fingerprint>/metrics.json`` (``pipeline.study``), so a rerun
skips finished cells and a killed study resumes.

Grids:
    main               dive, pvse, pcme, maxmatch, vsepp (profiles/*.yaml) over ``--seeds`` seeds; PCME also evaluated
                       by the mean cosine over its samples and with mu only
    similarity_x_head  Table 3: {smooth_chamfer, chamfer, max_similarity, match_probability} x {slot, pienet,
                       transformer}, the DivE loss and K = 4 otherwise
    k, t, alpha        Table 4: K in 1..6, T in 1..6, alpha in {1, 2, 4, 8, 16, 32, 64}
    elements           Table 5: the main DivE model (seed 0) evaluated with one element at a time and all-but-one,
                       image side and text side
    smoke              two cells (dive, vsepp), for tests and smoke runs

Budget (the default sizes, ``DEFAULT``): 37 distinct cells (``main`` with 2 seeds) of 5 epochs x 16 batches (the
demo's 2,000 train images). Measured in the quick run on the 2-core box, one thread per cell: 1.5 s per batch on
average over the default cells' kinds (DivE's SPM 1.6-2.8 s, MaxMatch ~3 s, PIE-Net ~1 s, VSE++ 0.3 s) and ~6 s
per-cell overhead, so ~38 min with 2 workers on an idle box, within the 60-minute budget; another job on the 2 cores
stretches it 1.5-2.5x. docs/results.md re-estimates it from the batch times measured in the run and records the load
at its start. ``--seeds 3`` adds 5 cells (~6 min).
``--quick`` (``QUICK``): 2 epochs of at most 4 batches, 2 seeds, the 6 Table-3 cells the paper reports, K in {1,2,4},
T in {1,4}, alpha in {1,16,64}: 20 distinct cells, a few minutes; it checks the machinery, not the paper.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer

from pipeline.cli import call, git_sha, set_offline_env, setup_logging
from pipeline.params import Params, ParamsError, load_params
from pipeline.profiles import PROFILES_DIR, SYSTEM_PROFILES, load_profile, merge_overlay, validate_merged
from pipeline.study import (
    PAPER_ELEMENTS,
    PAPER_MAIN,
    PAPER_SIMILARITY_X_HEAD,
    PAPER_SWEEPS,
    SWEEP_SYMBOL,
    Cell,
    CellJob,
    JobOutcome,
    Row,
    Variant,
    aggregate,
    collect,
    execute,
    is_degenerate,
    missing_variants,
    plan,
    read_record,
    seed_noise,
    verdict,
    write_record,
)

logger = logging.getLogger("setemb.stage.study")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

GRIDS = ("main", "similarity_x_head", "k", "t", "alpha", "elements")
EXTRA_GRIDS = ("smoke",)
SIMILARITIES = ("smooth_chamfer", "chamfer", "max_similarity", "match_probability")
HEADS = ("slot", "pienet", "transformer")
SIMILARITY_KWARGS = {  # what each similarity is trained with in Table 3
    "smooth_chamfer": {"alpha": 16.0},
    "chamfer": {},
    "max_similarity": {},
    "match_probability": {"scale": 1.0, "shift": 0.0},  # DivE code's "mp": a = 1, b = 0, never learnt
}


@dataclass(frozen=True)
class StudySettings:
    """Sizes of one study run: training length and grid values."""

    epochs: int = 5
    limit_batches: int | None = None
    seeds: int = 2
    k_values: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    t_values: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    alpha_values: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    # None = the full similarity x head product; else the listed (similarity, head) pairs
    pairs: tuple[tuple[str, str], ...] | None = None


DEFAULT = StudySettings()
QUICK = StudySettings(
    epochs=2,
    limit_batches=4,
    seeds=2,
    k_values=(1, 2, 4),
    t_values=(1, 4),
    alpha_values=(1.0, 16.0, 64.0),
    pairs=tuple(PAPER_SIMILARITY_X_HEAD),  # the six cells the paper reports
)


# --------------------------------------------------------------------------------------------------------- grids
def study_base(params: Params, settings: StudySettings) -> dict[str, Any]:
    """params.yaml with the study settings: local-mode training, ``epochs``, embedding of the evaluated split only."""
    data = params.model_dump(mode="json")
    data["train"]["ray"]["num_workers"] = 0
    data["train"]["optim"]["epochs"] = settings.epochs
    data["train"]["limit_batches"] = settings.limit_batches
    data["embed"].update({"splits": [data["evaluate"]["split"]], "save_attention": False})
    return data


def _cell(grid: str, label: str, data: dict[str, Any], **kwargs: Any) -> Cell:
    params = validate_merged(data, f"study cell {grid}:{label}").model_dump(mode="json")
    return Cell(grid, label, params, seed=params["seed"], **kwargs)


def _dive(base: dict[str, Any], profiles_dir: Path, seed: int = 0) -> dict[str, Any]:
    return merge_overlay(base, {**load_profile("dive", profiles_dir), "seed": seed})


def _element_variants(params: dict[str, Any]) -> tuple[Variant, ...]:
    model = params["train"]["model"]
    sizes = {"image": model["num_embeddings"], "text": model["text_num_embeddings"] or model["num_embeddings"]}
    variants = [Variant("all")]
    for side, K in sizes.items():
        for i in range(K):
            variants.append(Variant(f"{side}_only_{i}", {f"{side}_elements": [i]}))
        for i in range(K if K > 1 else 0):
            variants.append(Variant(f"{side}_drop_{i}", {f"{side}_elements": [j for j in range(K) if j != i]}))
    return tuple(variants)


def build_grid(
    name: str, base: dict[str, Any], settings: StudySettings, profiles_dir: Path = PROFILES_DIR
) -> list[Cell]:
    """The cells of grid ``name`` over the study base params.

    Raises:
        ParamsError: unknown grid, or a cell whose params do not validate.
    """
    cells: list[Cell] = []
    if name in ("main", "smoke"):
        systems = SYSTEM_PROFILES if name == "main" else ("dive", "vsepp")
        for seed in range(settings.seeds if name == "main" else 1):
            for system in systems:
                data = merge_overlay(base, {**load_profile(system, profiles_dir), "seed": seed})
                variants = [Variant()]
                if system == "pcme":
                    variants += [
                        Variant("mean_samples", {"similarity": "mean_similarity"}),
                        Variant("mu_only", model={"head_kwargs": {"sample_in_eval": False}}),
                    ]
                cells.append(_cell(name, system, data, variants=tuple(variants)))
    elif name == "similarity_x_head":
        pairs = settings.pairs or tuple((s, h) for s in SIMILARITIES for h in HEADS)
        for similarity, head in pairs:
            data = _dive(base, profiles_dir)
            loss = data["train"]["loss"]["kwargs"]
            loss.update(similarity=similarity, similarity_kwargs=dict(SIMILARITY_KWARGS[similarity]))
            model = data["train"]["model"]
            model["head"] = head
            if head == "pienet":  # PIE-Net takes neither the SPM kwargs nor a positional code
                model.update(head_kwargs={}, image_head_kwargs={}, text_head_kwargs={})
            tags = {"similarity": similarity, "head": head}
            cells.append(_cell(name, f"{similarity} × {head}", data, tags=tags))
    elif name in ("k", "t", "alpha"):
        values = {"k": settings.k_values, "t": settings.t_values, "alpha": settings.alpha_values}[name]
        for value in values:
            data = _dive(base, profiles_dir)
            if name == "k":
                data["train"]["model"]["num_embeddings"] = int(value)
            elif name == "t":
                data["train"]["model"]["head_kwargs"]["num_iterations"] = int(value)
            else:
                data["train"]["loss"]["kwargs"]["similarity_kwargs"] = {"alpha": float(value)}
            cells.append(_cell(name, f"{SWEEP_SYMBOL[name]}={value:g}", data, x=value))
    elif name == "elements":
        data = validate_merged(_dive(base, profiles_dir), "dive").model_dump(mode="json")
        cells.append(_cell(name, "dive", data, variants=_element_variants(data)))
    else:
        raise ParamsError(f"unknown grid {name!r}; known: {', '.join((*GRIDS, *EXTRA_GRIDS, 'all'))}")
    return cells


# ---------------------------------------------------------------------------------------------------- one cell
def _patched_model(model_dir: Path, out: Path, overrides: dict[str, Any]) -> Path:
    """A copy of the exported model whose ``config.json["model"]`` has ``overrides`` merged in (same weights)."""
    from pipeline.ray_train import CONFIG_FILE

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(model_dir, out)
    config = json.loads((out / CONFIG_FILE).read_text())
    config["model"] = merge_overlay(config["model"], overrides)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def distinct_score_fraction(embeddings: Path, info: dict[str, Any], rows: int = 64) -> float:
    """Fraction of distinct values among the scores of the first ``rows`` images against every caption, with the
    similarity and element subsets the evaluation used (``info`` of its metrics).

    About 1 for a working scorer; near 0 when the scores saturate (e.g. a match probability that underflows to 0
    for far-apart samples), which the recall tie rule would report as perfect retrieval.
    """
    from setemb.similarity import score
    from setemb.store import EmbeddingStore

    store, split = EmbeddingStore.open(embeddings), info["split"]

    def pick(sets: Any, selected: str) -> Any:
        return sets if selected == "all" else sets[:, [int(i) for i in selected.split(",")]]

    image = pick(store[f"{split}/image"].embeddings[:rows], info["image_elements"])  # [rows, K', D]
    text = pick(store[f"{split}/text"].embeddings, info["text_elements"])  # [C, L', D]
    scores = score(image, text, similarity=info["similarity"], **json.loads(info["similarity_kwargs"]))
    return scores.unique().numel() / max(scores.numel(), 1)


def run_cell(job: CellJob) -> dict[str, Any]:
    """Train the job's model unless cached, then embed and evaluate every missing variant; returns metrics.json.

    Runs in a Ray task or in-process. Training resumes from its last finished epoch after a kill.
    """
    import ray.train  # noqa: F401 - configures Ray's loggers on import: quieten them after that

    from pipeline.ray_train import HISTORY_FILE, run_training
    from stages.embed import run_embed
    from stages.evaluate import run_evaluate

    set_offline_env()
    for noisy in ("pipeline.ray_train", "setemb", "ray", "ray.train", "stages"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    directory = Path(job.directory)
    params = Params.model_validate(job.params)
    record = read_record(directory) or {"fingerprint": job.fingerprint, "params": job.params, "variants": {}}
    record["labels"] = sorted(set(record.get("labels", [])) | set(job.labels))
    model_dir = directory / "model"
    if "train" not in record or not (model_dir / "config.json").is_file():
        storage, run_name = directory / "training", "run"
        start = time.perf_counter()
        result = run_training(
            params,
            features=job.features,
            storage_path=storage,
            run_name=run_name,
            resume=(storage / run_name / HISTORY_FILE).is_file(),
            quiet=True,
            model_dir=model_dir,
        )
        history = result.history
        record["train"] = {
            "seconds": time.perf_counter() - start,
            "epochs": len(history),
            "steps": sum(int(h.get("train_steps", 0)) for h in history),
            "epoch_seconds": sum(float(h.get("epoch_time_s", 0.0)) for h in history),
            "best_val_rsum": result.best_rsum,
            "final_train_loss": history[-1].get("train_loss") if history else None,
        }
        write_record(directory, record)
        shutil.rmtree(storage, ignore_errors=True)
    for variant in missing_variants(record, job.variants):
        start = time.perf_counter()
        model = (
            model_dir
            if not variant.model
            else _patched_model(model_dir, directory / f"model-{variant.key}", variant.model)
        )
        embeddings = directory / (f"embeddings-{variant.key}.zarr" if variant.model else "embeddings.zarr")
        run_embed(params, features=job.features, model=model, out=embeddings, quiet=True)
        evaluate = merge_overlay(job.params, {"evaluate": variant.evaluate})
        results = run_evaluate(
            validate_merged(evaluate, f"variant {variant.name}"),
            embeddings=embeddings,
            model=model,
            relevance=job.relevance,
            metrics=directory / "eval" / f"{variant.key}.json",
            plots=directory / "eval" / f"plots-{variant.key}",
        )
        record["variants"][variant.key] = {
            **variant.to_json(),
            "seconds": time.perf_counter() - start,
            "distinct_scores": distinct_score_fraction(embeddings, results["info"]),
            "metrics": results,
        }
        write_record(directory, record)
    return record


# ------------------------------------------------------------------------------------------------------- report
def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _cellstat(stats: dict, key: tuple[str, str, str], digits: int = 1) -> str:
    s = stats.get(key)
    return "–" if s is None else s.format(digits)


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
    labels = [s for s in PAPER_MAIN if any(r.grid == grid and r.label == s for r in rows)]
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
        "numbers.",
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
                _cellstat(stats["rsum"], key) + (TIED if key in tied else ""),
                _cellstat(stats["log_cv_image"], key, 2),
                _cellstat(stats["log_cv_text"], key, 2),
                _num(paper_rsum),
                _num(paper_cv, 2),
            ]
        )
    header = ["similarity", "head", "RSUM", "ln CV img", "ln CV txt", "paper RSUM", "paper ln CV"]
    return [
        "## Similarity × head (paper Table 3)",
        "",
        "DivE loss (triplet + diversity + MMD) and K = 4 throughout; `slot` = DivE's SPM, `transformer` = the same "
        "block with softmax over inputs, `pienet` = PVSE's head. ln CV = log of the mean circular variance of the "
        "test sets (higher = more diverse elements). Paper: F30K, BUTD ROI + bi-GRU.",
        "",
        *_table(header, body),
        "",
        *([TIED_NOTE, ""] if any(TIED in row[2] for row in body) else []),
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
                _cellstat(stats["rsum"], (grid, label, "default")) + (TIED if (grid, label, "default") in tied else ""),
                _cellstat(stats["log_cv_image"], (grid, label, "default"), 2),
                _cellstat(stats["log_cv_text"], (grid, label, "default"), 2),
                _num(PAPER_SWEEPS[grid].get(x)),
            ]
            for x, label in points
        ]
        lines += _table([SWEEP_SYMBOL[grid], "RSUM", "ln CV img", "ln CV txt", "paper RSUM"], body) + [""]
        lines += [TIED_NOTE, ""] if any(TIED in row[1] for row in body) else []
        if grid in plots:
            lines += [f"![RSUM vs {SWEEP_SYMBOL[grid]}]({os.path.relpath(plots[grid], out_dir)})", ""]
    return lines


def _section_elements(rows: list[Row]) -> list[str]:
    element_rows = [r for r in rows if r.grid == "elements"]
    if not element_rows:
        return []
    full = next((r.metrics.get("rsum") for r in element_rows if r.variant == "all"), None)
    body = []
    for r in element_rows:
        side, _, rest = r.variant.partition("_")
        kind, _, index = rest.partition("_")
        what = "all elements" if r.variant == "all" else f"{side}: {'only' if kind == 'only' else 'all but'} {index}"
        delta = None if full is None or "rsum" not in r.metrics else r.metrics["rsum"] - full
        body.append(
            [
                what,
                _num(r.metrics.get("rsum")) + (TIED if is_degenerate(r) else ""),
                "–" if delta is None else f"{delta:+.1f}",
                _num(PAPER_ELEMENTS.get(r.variant)),
            ]
        )
    return [
        "## Evaluating with a subset of the set (paper Table 5)",
        "",
        "The main DivE model (seed 0) scored with smooth-Chamfer on a subset of its image (or text) set elements. "
        "Element indices are 0-based here and 1-based in the paper (ours `1` = the paper's (2)); which slot learns "
        "what is arbitrary, so compare the spread, not the row. Paper: F30K, only {1,3,4} is given for all-but-one.",
        "",
        *_table(["evaluated with", "RSUM", "Δ vs all", "paper RSUM"], body),
        "",
        *([TIED_NOTE, ""] if any(TIED in row[1] for row in body) else []),
    ]


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
) -> str:
    """docs/results.md: setting, wall time, Tables 3-5-shaped tables with the paper's numbers, plots, verdict."""
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
        f"- Training per cell: {settings.epochs} epochs"
        + (f" of at most {settings.limit_batches} batches" if settings.limit_batches else "")
        + f", {base['train']['images_per_batch']} images per batch, local mode (one thread per cell); seeds per "
        f"system in the main comparison: {settings.seeds}; ablations: seed 0.",
        f"- Noise yardstick: {'pooled seed std of the main systems, σ = ' + _num(noise) + ' RSUM' if noise is not None else 'none (one seed per system)'}.",  # noqa: E501
        "- Paper numbers (METHOD §7) come from F30K / COCO with BUTD or ResNet features and D = 1024: compare "
        "orderings and gaps, not absolute values.",
        "",
        "## Wall time",
        "",
        f"- This invocation: {wall_seconds / 60:.1f} min for {len(ran)} trained/evaluated cells "
        f"({sum(o.cached for o in outcomes)} read from the cache, {len(failed)} failed), grids: {', '.join(grids)}.",
    ]
    if train_seconds:
        lines.append(
            f"- Training per cell: mean {sum(train_seconds) / len(train_seconds):.0f} s, max "
            f"{max(train_seconds):.0f} s (one thread; includes start-up and per-epoch validation)."
        )
    if estimate:
        lines.append(
            f"- Estimated default study (`--grid all`, {estimate['cells']:.0f} distinct cells, "
            f"{estimate['epochs']:.0f} epochs of {estimate['steps_per_epoch']:.0f} batches, "
            f"{estimate['workers']:.0f} worker(s)): "
            f"~{estimate['minutes']:.0f} min, from this run's seconds per batch of each cell's kind (mean "
            f"{estimate['seconds_per_step']:.2f} s over the default cells) and {estimate['overhead_seconds']:.0f} s "
            "per-cell overhead; timings from a shared machine (see the load average above) overestimate an idle one."
        )
    lines.append("")
    if failed:
        lines += ["## Failed cells", ""] + [f"- `{o.job.labels[0]}`: {o.error}" for o in failed] + [""]
    for grid in ("main", "smoke"):
        if grid in grids:
            lines += _section_main(rows, grid)
    if "similarity_x_head" in grids:
        lines += _section_similarity_x_head(rows)
    lines += _section_sweeps(rows, plots, out.parent)
    lines += _section_elements(rows)
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
        "Each line compares our numbers explicitly: *holds* = the paper's direction by more than the seed noise, "
        "*does not hold* = the opposite direction by more than the noise, *inconclusive* = within the noise "
        f"({'σ = ' + _num(noise) if noise is not None else 'no noise estimate: the sign decides'})."
    )
    lines.append("")
    if not claims:
        lines.append("No claim could be checked (no grid with the needed cells ran).")
    for c in claims:
        lines.append(f"- **{c.status}** ({c.source}) {c.claim}: {c.evidence}.")
    held = sum(c.status == "holds" for c in claims)
    lines += [
        "",
        f"Summary: {held} of {len(claims)} checked claims hold, "
        f"{sum(c.status == 'does not hold' for c in claims)} do not, "
        f"{sum(c.status == 'inconclusive' for c in claims)} are inconclusive.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- driver
def ensure_features(params: Params, features: Path) -> Path:
    """The feature store, extracted first (and the shapes dataset generated) when absent or incomplete.

    An existing complete store is reused as is, whatever params made it (the study never re-extracts).
    """
    from setemb.store import FeatureStore, IncompleteStoreError
    from stages.extract import run_extract
    from stages.prepare import run_prepare

    try:
        FeatureStore.open(features)
        return features
    except (FileNotFoundError, IncompleteStoreError):
        pass
    paths = params.paths
    dataset_json = Path(paths.dataset_json)
    if params.extract.source == "karpathy" and not dataset_json.is_file() and dataset_json.parent == Path(paths.shapes):
        logger.info("no dataset at %s: generating the shapes dataset", dataset_json)
        run_prepare(params, Path(paths.shapes))
    logger.info("no complete feature store at %s: extracting it once for the whole study", features)
    run_extract(
        params.extract,
        features,
        dataset_json=dataset_json,
        image_root=Path(paths.image_root),
        precomp_root=Path(paths.precomp_root) if paths.precomp_root else None,
    )
    return features


def _cost_class(params: dict[str, Any]) -> tuple:
    """What drives the cost of a training batch: head, similarity (or loss), K, T."""
    model, loss = params["train"]["model"], params["train"]["loss"]
    return (
        model["head"],
        loss["kwargs"].get("similarity", loss["name"]),
        model["num_embeddings"],
        model["head_kwargs"].get("num_iterations"),
    )


def estimate_default_study(
    outcomes: list[JobOutcome], base_params: Params, features: Path, digest: str, workers: int, profiles_dir: Path
) -> dict[str, float] | None:
    """Wall time of ``--grid all`` at the default sizes from this run's measurements.

    Each default cell costs the mean measured per-cell overhead (start-up, validation, evaluation) plus its batches
    times the seconds per batch measured for its cost class (head, similarity, K, T), or the median over the measured
    cells for a class this run did not train; the sum is divided by the workers.
    """
    import statistics

    from setemb.store import FeatureStore

    measured: dict[tuple, list[float]] = {}
    overheads = []
    for o in outcomes:
        train = (o.record or {}).get("train", {})
        if train.get("steps"):
            measured.setdefault(_cost_class(o.job.params), []).append(train["epoch_seconds"] / train["steps"])
            evals = [v["seconds"] for v in o.record.get("variants", {}).values()]
            overheads.append(train["seconds"] - train["epoch_seconds"] + (min(evals) if evals else 0.0))
    if not measured or workers < 1:
        return None
    per_class = {k: statistics.fmean(v) for k, v in measured.items()}
    fallback = statistics.median([x for v in measured.values() for x in v])
    overhead = statistics.fmean(overheads)
    base = study_base(base_params, DEFAULT)
    cells = [c for g in GRIDS for c in build_grid(g, base, DEFAULT, profiles_dir)]
    _, jobs = plan(cells, "unused", features=features, features_digest=digest, relevance=None)
    n_train = len(FeatureStore.open(features)["train"].image)
    steps = math.ceil(n_train / base["train"]["images_per_batch"])
    batch_seconds = [per_class.get(_cost_class(j.params), fallback) for j in jobs]
    seconds = sum(overhead + b * steps * DEFAULT.epochs for b in batch_seconds) / workers
    return {
        "cells": len(jobs),
        "epochs": DEFAULT.epochs,
        "steps_per_epoch": steps,
        "workers": workers,
        "seconds_per_step": statistics.fmean(batch_seconds),
        "overhead_seconds": overhead,
        "minutes": seconds / 60,
    }


def run_study(
    params: Params,
    *,
    grids: list[str],
    settings: StudySettings,
    quick: bool = False,
    workers: int = 0,
    cache: Path = Path("artifacts/study"),
    out: Path = Path("docs/results.md"),
    features: Path | None = None,
    profiles_dir: Path = PROFILES_DIR,
    command: str = "python -m stages.study",
    quiet: bool = True,
) -> dict[str, Any]:
    """Build the grids, run the missing cells, write the report ``out`` (with its plots beside it).

    Returns:
        ``{"cells": distinct cells, "ran": run now, "cached": read from the cache, "failed": [labels], "out": out}``.

    Raises:
        ParamsError: unknown grid or an invalid cell.
    """
    from stages.train import features_fingerprint

    start, load = time.perf_counter(), os.getloadavg()[0]
    base = study_base(params, settings)
    cells = [c for g in grids for c in build_grid(g, base, settings, profiles_dir)]  # validate before any work
    features = ensure_features(params, Path(features or params.paths.features))
    digest = features_fingerprint(features)
    relevance = params.paths.relevance or None
    cells, jobs = plan(cells, cache, features=features, features_digest=digest, relevance=relevance)

    def progress(outcome: JobOutcome, finished: int, total: int) -> None:
        state = "FAILED " + outcome.error if outcome.error else f"{outcome.seconds:.0f} s"
        logger.warning("[%d/%d] %s: %s", finished, total, ", ".join(outcome.job.labels), state)

    outcomes = execute(jobs, run_cell, workers=workers, quiet=quiet, on_done=progress)
    estimate = estimate_default_study(outcomes, params, features, digest, max(workers, 1), profiles_dir)
    text = render_report(
        cells,
        outcomes,
        out=out,
        grids=grids,
        settings=settings,
        quick=quick,
        workers=workers,
        wall_seconds=time.perf_counter() - start,
        base=base,
        estimate=estimate,
        command=command,
        load=load,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    failed = [o.job.labels[0] for o in outcomes if o.error]
    return {
        "cells": len(jobs),
        "ran": sum(not o.cached for o in outcomes) - len(failed),
        "cached": sum(o.cached for o in outcomes),
        "failed": failed,
        "out": str(out),
    }


@app.command()
def main(
    grid: str = typer.Option("all", "--grid", help="main | similarity_x_head | k | t | alpha | elements | smoke | all"),
    quick: bool = typer.Option(False, "--quick", help="2 epochs of 4 batches, reduced grids: a few minutes in all"),
    seeds: int | None = typer.Option(None, "--seeds", min=1, help="seeds per system in the main grid (default 2)"),
    epochs: int | None = typer.Option(None, "--epochs", min=1, help="override the epochs per cell"),
    workers: int | None = typer.Option(
        None, "--workers", min=0, help="cells in parallel as Ray tasks (default: one per core; 0 = in-process)"
    ),
    out: Path = typer.Option(Path("docs/results.md"), "--out", help="report to write (plots go to <out stem>/)"),
    cache: Path = typer.Option(Path("artifacts/study"), "--cache", help="per-cell cache: <cache>/<fingerprint>/"),
    params_path: Path = typer.Option(Path("params.yaml"), "--params", help="params.yaml: the study's base"),
    features: Path | None = typer.Option(None, "--features", help="feature store (default paths.features)"),
    profiles_dir: Path = typer.Option(PROFILES_DIR, "--profiles-dir", help="folder of the system profiles"),
    quiet: bool = typer.Option(False, "--quiet", help="warnings only"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run the paper's comparisons and ablations on the embedded benchmark and write docs/results.md."""
    set_offline_env()
    setup_logging(quiet)
    params = call(load_params, params_path, debug=debug)
    settings = QUICK if quick else DEFAULT
    if seeds is not None or epochs is not None:
        from dataclasses import replace

        settings = replace(settings, seeds=seeds or settings.seeds, epochs=epochs or settings.epochs)
    grids = list(GRIDS) if grid == "all" else [grid]
    workers = os.cpu_count() or 1 if workers is None else workers
    command = "python -m stages.study --grid " + grid + (" --quick" if quick else "")
    command += "".join(f" --{k} {v}" for k, v in (("seeds", seeds), ("epochs", epochs)) if v is not None)
    summary = call(
        run_study,
        params,
        grids=grids,
        settings=settings,
        quick=quick,
        workers=workers,
        cache=cache,
        out=out,
        features=features,
        profiles_dir=profiles_dir,
        command=command,
        quiet=quiet,
        debug=debug,
    )
    typer.echo(
        f"{summary['cells']} cells: {summary['ran']} ran, {summary['cached']} cached, {len(summary['failed'])} failed; "
        f"report at {summary['out']}"
    )
    if summary["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
