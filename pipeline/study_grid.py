"""The study's grids and the work of one cell: settings, grid building, the cell runner, the feature store, and the
default-study estimate.

Every grid starts from params.yaml with the study settings applied (``study_base``: local-mode training,
``epochs``, test-split embedding without attention maps); ``build_grid`` turns it into validated ``Cell``s of
``pipeline.study``, whose engine plans, caches and runs them. ``run_cell`` is the runner the engine calls for one
job (train -> embed -> evaluate every missing variant), in-process or in a Ray task.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import set_offline_env
from pipeline.params import Params, ParamsError
from pipeline.profiles import PROFILES_DIR, SYSTEM_PROFILES, load_profile, merge_overlay, validate_merged
from pipeline.study import Cell, CellJob, JobOutcome, Variant, missing_variants, plan, read_record, write_record
from pipeline.study_verdict import PAPER_SIMILARITY_X_HEAD, SWEEP_SYMBOL

logger = logging.getLogger("setemb.stage.study")
QUIET_LOGGERS = ("pipeline.ray_train", "setemb", "ray", "ray.train", "stages")  # WARNING and up while a cell runs

GRIDS = ("main", "similarity_x_head", "k", "t", "alpha", "elements")
EXTRA_GRIDS = ("smoke", "plateau")
PLATEAU_SYSTEMS = ("dive", "vsepp")  # the study base and the single-vector baseline: the slowest and fastest learner
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

    # 4 = the most that fits the 90-minute budget at 3 seeds and 8 images per batch (benchmarks/bench_study_step.py);
    # the longer curve (docs/plateau.json) still rises after it, and the report computes whether the cells reach it
    epochs: int = 4
    # images per batch of every cell (params.yaml: 128). On `shapes` a smaller batch learns more per epoch and per CPU
    # second (more updates, fewer in-batch false negatives for the hardest-negative triplet: docs/DESIGN.md "Study
    # verdicts"): DivE's test RSUM after 4 epochs, seed 0, is 266.2 at 8, 233.9 at 16 (6765058), 176.9 at 32 (4780fac)
    images_per_batch: int = 8
    limit_batches: int | None = None
    seeds: int = 3  # every grid; pairs cells by seed in the verdict (pipeline.study_stats)
    k_values: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    t_values: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    alpha_values: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    # None = the full similarity x head product; else the listed (similarity, head) pairs. Default: the six the
    # paper reports, the only ones its Table 3 claims compare
    pairs: tuple[tuple[str, str], ...] | None = tuple(PAPER_SIMILARITY_X_HEAD)
    plateau_epochs: int = 12  # --grid plateau: the longer schedule whose curve the cells are checked against
    # where ``epochs`` came from, quoted by the report next to the measured curve (docs/plateau.json)
    epochs_source: str = (
        "the most that fits the 90-minute budget with 3 seeds at 8 images per batch (benchmarks/bench_study_step.py)"
    )


DEFAULT = StudySettings()
QUICK = StudySettings(
    epochs=2,
    plateau_epochs=3,
    epochs_source="quick run",
    limit_batches=4,
    seeds=2,
    k_values=(1, 2, 4),
    t_values=(1, 4),
    alpha_values=(1.0, 16.0, 64.0),
)


# --------------------------------------------------------------------------------------------------------- grids
def study_base(params: Params, settings: StudySettings) -> dict[str, Any]:
    """params.yaml with the study settings: local-mode training, ``epochs``, ``images_per_batch``, embedding of the
    evaluated split only."""
    data = params.model_dump(mode="json")
    data["train"]["ray"]["num_workers"] = 0
    data["train"]["optim"]["epochs"] = settings.epochs
    data["train"]["images_per_batch"] = settings.images_per_batch
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
    elif name == "plateau":
        for seed in range(settings.seeds):
            for system in PLATEAU_SYSTEMS:
                data = merge_overlay(base, {**load_profile(system, profiles_dir), "seed": seed})
                data["train"]["optim"]["epochs"] = settings.plateau_epochs
                cells.append(_cell(name, system, data))
    elif name == "similarity_x_head":
        pairs = settings.pairs or tuple((s, h) for s in SIMILARITIES for h in HEADS)
        for seed in range(settings.seeds):
            for similarity, head in pairs:
                data = _dive(base, profiles_dir, seed)
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
        for seed in range(settings.seeds):
            for value in values:
                data = _dive(base, profiles_dir, seed)
                if name == "k":
                    data["train"]["model"]["num_embeddings"] = int(value)
                elif name == "t":
                    data["train"]["model"]["head_kwargs"]["num_iterations"] = int(value)
                else:
                    data["train"]["loss"]["kwargs"]["similarity_kwargs"] = {"alpha": float(value)}
                cells.append(_cell(name, f"{SWEEP_SYMBOL[name]}={value:g}", data, x=value))
    elif name == "elements":
        for seed in range(settings.seeds):
            data = validate_merged(_dive(base, profiles_dir, seed), "dive").model_dump(mode="json")
            cells.append(_cell(name, "dive", data, variants=_element_variants(data)))
    else:
        raise ParamsError(f"unknown grid {name!r}; known: {', '.join((*GRIDS, *EXTRA_GRIDS, 'all'))}")
    return cells


# ---------------------------------------------------------------------------------------------------- one cell
def _patched_model(model_dir: Path, out: Path, overrides: dict[str, Any]) -> Path:
    """A copy of the exported model whose ``config.json["model"]`` has ``overrides`` merged in (same weights)."""
    from pipeline.checkpoints import CONFIG_FILE

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
    from setemb.embedding_store import EmbeddingStore
    from setemb.similarity import score

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

    from pipeline.embedding import run_embed
    from pipeline.evaluation import run_evaluate
    from pipeline.ray_train import HISTORY_FILE, run_training

    set_offline_env()
    for noisy in QUIET_LOGGERS:
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
            "val_rsum": [h.get("val_rsum") for h in history],  # the validation curve (--grid plateau)
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


def ensure_features(params: Params, features: Path) -> Path:
    """The feature store, extracted first (and the shapes dataset generated) when absent or incomplete.

    An existing complete store is reused without re-extracting (the study never overwrites a store), but only when it
    carries the fingerprint that ``params.extract`` and the data give (``pipeline.feature_cache.store_fingerprint``,
    what ``run_extract`` itself checks); when the data cannot be read to sign it, its backbones and test-time
    transform must at least match.

    Raises:
        ParamsError: the store was extracted with other params or from other data.
    """
    from pipeline.feature_cache import extraction_mismatch, run_extract, store_fingerprint
    from pipeline.shapes import run_prepare
    from setemb.feature_store import FeatureStore
    from setemb.store import IncompleteStoreError

    paths = params.paths
    dataset_json = Path(paths.dataset_json)
    precomp_root = Path(paths.precomp_root) if paths.precomp_root else None
    try:
        store = FeatureStore.open(features)
    except (FileNotFoundError, IncompleteStoreError):
        store = None
    if store is not None:
        attrs = dict(store.attrs)
        differences = extraction_mismatch(params.extract, attrs)
        if not differences:
            try:
                expected, _ = store_fingerprint(params.extract, dataset_json, Path(paths.image_root), precomp_root)
                if attrs.get("fingerprint") != expected:
                    differences = [f"fingerprint: store {attrs.get('fingerprint')}, params and data {expected}"]
            except (FileNotFoundError, ParamsError):
                logger.warning("cannot read the data behind %s to check its fingerprint: reusing it", features)
        if differences:
            raise ParamsError(
                f"feature store {features} does not match params.yaml ({'; '.join(differences)}): re-extract it "
                "(dvc repro extract) or pass --features with a matching store"
            )
        return features
    if params.extract.source == "karpathy" and not dataset_json.is_file() and dataset_json.parent == Path(paths.shapes):
        logger.info("no dataset at %s: generating the shapes dataset", dataset_json)
        run_prepare(params, Path(paths.shapes))
    logger.info("no complete feature store at %s: extracting it once for the whole study", features)
    image_root = Path(paths.image_root)
    run_extract(params.extract, features, dataset_json=dataset_json, image_root=image_root, precomp_root=precomp_root)
    return features


# -------------------------------------------------------------------------------------------------- estimate
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
    outcomes: list[JobOutcome],
    base_params: Params,
    features: Path,
    digest: str,
    workers: int,
    profiles_dir: Path,
    settings: StudySettings = DEFAULT,
) -> dict[str, float] | None:
    """Wall time of ``--grid all`` at the ``settings`` sizes (the defaults) from this run's measurements.

    A cell costs, per epoch, its batches times the seconds per batch measured for its cost class (head, similarity,
    K, T; the median over the measured cells for a class this run did not train) plus the measured non-training
    seconds per epoch (validation, checkpoint and, spread over the epochs, start-up: so an estimate for more epochs
    than were measured errs long), and once per evaluation variant the mean measured variant seconds. The sum over
    the distinct cells is divided by the workers. ``minutes = fixed_minutes + epochs * minutes_per_epoch``.
    """
    import statistics

    from setemb.feature_store import FeatureStore

    measured: dict[tuple, list[float]] = {}
    per_epoch_overheads, variant_seconds = [], []
    for o in outcomes:
        train = (o.record or {}).get("train", {})
        if train.get("steps"):
            measured.setdefault(_cost_class(o.job.params), []).append(train["epoch_seconds"] / train["steps"])
            per_epoch_overheads.append((train["seconds"] - train["epoch_seconds"]) / max(train["epochs"], 1))
            variant_seconds += [v["seconds"] for v in o.record.get("variants", {}).values()]
    if not measured or workers < 1:
        return None
    per_class = {k: statistics.fmean(v) for k, v in measured.items()}
    fallback = statistics.median([x for v in measured.values() for x in v])
    epoch_overhead = statistics.fmean(per_epoch_overheads)
    variant_cost = statistics.fmean(variant_seconds) if variant_seconds else 0.0
    base = study_base(base_params, settings)
    cells = [c for g in GRIDS for c in build_grid(g, base, settings, profiles_dir)]
    _, jobs = plan(cells, "unused", features=features, features_digest=digest, relevance=None)
    n_train = len(FeatureStore.open(features)["train"].image)
    steps = math.ceil(n_train / base["train"]["images_per_batch"])
    if settings.limit_batches:
        steps = min(steps, settings.limit_batches)
    batch_seconds = [per_class.get(_cost_class(j.params), fallback) for j in jobs]
    per_epoch = sum(b * steps + epoch_overhead for b in batch_seconds) / workers
    fixed = sum(len(j.variants) for j in jobs) * variant_cost / workers
    return {
        "cells": len(jobs),
        "seeds": settings.seeds,
        "epochs": settings.epochs,
        "steps_per_epoch": steps,
        "workers": workers,
        "seconds_per_step": statistics.fmean(batch_seconds),
        "overhead_seconds": epoch_overhead * settings.epochs + variant_cost,  # per cell, besides its batches
        "minutes_per_epoch": per_epoch / 60,
        "fixed_minutes": fixed / 60,
        "minutes": (fixed + per_epoch * settings.epochs) / 60,
    }
