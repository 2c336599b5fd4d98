"""Train a set-embedding model on the feature store with Ray Train; export the best model; log epochs to dvclive.

Resume rule. The training storage (``paths.training``) is a persisted DVC out, so it survives a rerun of the stage.
Each run lives in ``<storage>/train-<fingerprint>``, where the fingerprint hashes everything that changes the result:
``params.train`` (without ``ray.address``, ``ray.max_failures`` and ``ray.cpus_per_worker``, which do not), ``seed``,
``extract.captions_per_image`` and a fingerprint of the feature store (root and group attrs, item ids, lengths and a
sample of the feature rows). By default (neither ``--resume`` nor ``--no-resume``) the stage resumes when that run
directory already holds at least one finished epoch (``history.json``), and starts fresh otherwise; a run of another
fingerprint is never resumed (its directory is left in place). ``--no-resume`` deletes and restarts the run;
``--resume`` always continues it.

The best model is exported inside the run directory by ``run_training`` and then copied to ``--out`` (staged in a
temp dir and renamed), so a resumed run whose epochs were all done still restores ``--out`` after DVC deleted it. The
dvclive directory is rebuilt from the run's full ``history.json`` at the end, so ``<live>/metrics.json`` and
``<live>/plots/metrics/*.tsv`` hold every epoch even when this process only trained the last ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.cli import StageError
from pipeline.files import replace_dir
from pipeline.params import Params, ParamsError, format_validation_error

logger = logging.getLogger("setemb.stage.train")

# ray settings that never change what is learnt: excluded from the run fingerprint
_NEUTRAL_RAY_KEYS = ("address", "max_failures", "cpus_per_worker")
_SAMPLE_ITEMS = 8  # items per group whose feature rows enter the store fingerprint
_NONFINITE = re.compile(r"non-finite loss at epoch \d+ step \d+[^\n]*")


# ------------------------------------------------------------------------------------------------- fingerprints
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def features_fingerprint(features: str | os.PathLike) -> str:
    """Content fingerprint of a finished feature store: root and group attrs, ids, lengths, and the feature rows of
    the first and last ``_SAMPLE_ITEMS`` items of every group (cheap even for COCO, and different whenever a
    re-extraction changed the backbone, its weights, the dataset or the items).

    Raises:
        FileNotFoundError: no store. StageError: the store is incomplete.
    """
    import numpy as np

    from setemb.feature_store import FeatureStore
    from setemb.store import IncompleteStoreError

    try:
        store = FeatureStore.open(features)
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    h = hashlib.sha256(json.dumps(store.attrs, sort_keys=True, default=str).encode())
    for split in store.splits:
        for modality in ("image", "text"):
            group = store.modality(split, modality)
            h.update(json.dumps([split, modality, group.attrs], sort_keys=True, default=str).encode())
            h.update("\x00".join(group.ids).encode())
            h.update(np.ascontiguousarray(group.lengths).tobytes())
            n = len(group)
            sample = sorted({*range(min(n, _SAMPLE_ITEMS)), *range(max(0, n - _SAMPLE_ITEMS), n)})
            if sample:
                local, global_, _ = group.batch(sample)
                h.update(local.numpy().tobytes())
                if global_ is not None:
                    h.update(global_.numpy().tobytes())
    return h.hexdigest()


def run_fingerprint(params: Params, features_digest: str) -> str:
    """Hash of everything that determines a training run's result (see the module docstring)."""
    train = params.train.model_dump(mode="json")
    for key in _NEUTRAL_RAY_KEYS:
        train["ray"].pop(key, None)
    payload = {
        "train": train,
        "seed": params.seed,
        "captions_per_image": params.extract.captions_per_image,
        "features": features_digest,
    }
    return _digest(payload)


def run_name_for(params: Params, features_digest: str) -> str:
    """``train-<12 hex digits of run_fingerprint>``: the Ray run name inside the training storage."""
    return f"train-{run_fingerprint(params, features_digest)[:12]}"


# ------------------------------------------------------------------------------------------------------ overrides
def apply_overrides(
    params: Params, *, workers: int | None = None, epochs: int | None = None, limit: int | None = None
) -> Params:
    """``params`` with the CLI overrides applied and validated again (ParamsError, exit 2, when invalid)."""
    from pydantic import ValidationError

    data = params.model_dump(mode="json")
    if workers is not None:
        data["train"]["ray"]["num_workers"] = workers
    if epochs is not None:
        data["train"]["optim"]["epochs"] = epochs
    if limit is not None:
        data["train"]["limit_batches"] = limit
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(f"invalid overrides:\n{format_validation_error(e)}") from None


# ------------------------------------------------------------------------------------------------------- dvclive
def write_live(live_dir: str | os.PathLike, history: list[dict[str, Any]]) -> Path:
    """Rebuild a dvclive directory from a run's full history (one step per epoch), replacing ``live_dir``.

    Writes ``<live_dir>/metrics.json`` (the last epoch) and ``<live_dir>/plots/metrics/<name>.tsv`` (every epoch),
    with ``Live(dvcyaml=False, save_dvc_exp=False)`` so dvc.yaml is never rewritten (PLATFORM §6).
    """
    from dvclive import Live

    live_dir = Path(live_dir)
    live_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{live_dir.name}.", dir=live_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the renamed folder should not be
    try:
        live = Live(str(staging), dvcyaml=False, save_dvc_exp=False, report=None)
        for entry in history:
            live.step = int(entry["epoch"])
            for key, value in entry.items():
                if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                    live.log_metric(key, value)
            live.next_step()
        live.end()
        replace_dir(staging, live_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return live_dir


# ----------------------------------------------------------------------------------------------------- failures
def _nonfinite_message(error: BaseException) -> str | None:
    """The NonFiniteLossError message inside ``error`` (raised directly in local mode, wrapped by Ray otherwise)."""
    from setemb.training import NonFiniteLossError

    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, NonFiniteLossError):
            return str(e)
        stack.extend(x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if isinstance(x, BaseException))
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(x for x in failures.values() if isinstance(x, BaseException))
    match = _NONFINITE.search(str(error))
    return match.group(0) if match else None


def _train_and_export(params, features, storage, run_name, resume, address, quiet, verbose, model_dir, live, out):
    # (positional on purpose: the one caller is run_train, which documents every argument)
    """``run_training`` under the stage's error contract, then the best model exported to ``out``."""
    from ray.train import TrainingFailedError

    from pipeline.checkpoints import CONFIG_FILE, export_model
    from pipeline.ray_train import run_training
    from setemb.store import IncompleteStoreError
    from setemb.training import NonFiniteLossError

    try:
        result = run_training(
            params,
            features=features,
            storage_path=storage,
            run_name=run_name,
            resume=resume,
            address=address,
            quiet=quiet,
            verbose=verbose,
            model_dir=model_dir,
            dvclive_dir=live,
        )
    except IncompleteStoreError as e:
        raise StageError(str(e)) from None
    except (NonFiniteLossError, TrainingFailedError) as e:  # local mode raises the first, Ray wraps it
        message = _nonfinite_message(e)
        if message is not None:
            raise StageError(f"training stopped: {message}") from e
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise StageError(f"Ray training failed ({type(e).__name__}): {first}; rerun with --debug for details") from e

    best_dir = Path(result.best_model)
    if not (best_dir / CONFIG_FILE).is_file():
        raise StageError(f"run {run_name} in {storage} exported no model; rerun with --no-resume to train from scratch")
    export_model(best_dir, out)
    return result


# ---------------------------------------------------------------------------------------------------------- stage
def run_train(
    params: Params,
    *,
    features: str | os.PathLike,
    storage: str | os.PathLike,
    out: str | os.PathLike,
    live: str | os.PathLike | None = None,
    resume: bool | None = None,
    address: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train ``params.train`` on ``features``; export the best model to ``out``; rebuild ``live`` from the history.

    Args:
        params: validated params (CLI overrides already applied).
        features: the feature store (``paths.features``).
        storage: Ray training storage (``paths.training``); the run is ``<storage>/train-<fingerprint>``.
        out: the exported best model directory (``paths.model``): ``model.pt``, ``loss.pt``, ``config.json``.
        live: dvclive directory (``paths.dvclive``), or None for none.
        resume: True continue, False restart, None = resume when the run directory holds a finished epoch.
        address: Ray cluster address (else ``train.ray.address`` / ``RAY_ADDRESS`` / a new local Ray).
        quiet: no progress bar and no per-epoch summary lines.
        verbose: Ray's worker logs on the console too (the stage's ``--debug``).

    Returns:
        Summary: ``run_name``, ``run_dir``, ``resumed``, ``epochs`` (epochs in the history), ``best_epoch``,
        ``best_val_rsum`` (None without a val split), ``model`` (``out``), ``final`` (last epoch's metrics).

    Raises:
        FileNotFoundError: no feature store. StageError: incomplete store, non-finite loss (with the epoch and step),
        failed Ray job, or no model exported.
    """
    from pipeline.checkpoints import CONFIG_FILE
    from setemb.locations import glob, is_url, join

    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    digest = features_fingerprint(features)
    run_name = run_name_for(params, digest)
    run_dir = join(storage, run_name)
    if resume is None:  # a run with a finished epoch: our history file, or (remote storage) a Ray checkpoint
        resume = bool(glob(run_dir, "checkpoint_*")) if is_url(run_dir) else (Path(run_dir) / "history.json").is_file()
    # remote storage: the driver exports the best checkpoint into a local scratch folder, then into `out`
    scratch = tempfile.TemporaryDirectory(prefix=".model.", dir=Path(out).resolve().parent) if is_url(run_dir) else None
    model_dir = Path(scratch.name) if scratch is not None else Path(run_dir) / "model"
    logger.info(
        "run %s in %s (%s); %d Ray workers",
        run_name,
        storage,
        "resuming" if resume else "fresh",
        params.train.ray.num_workers,
    )
    try:
        result = _train_and_export(params, features, storage, run_name, resume, address, quiet, verbose, model_dir,
                                   live, out)  # fmt: skip
    finally:
        if scratch is not None:
            scratch.cleanup()
    config = json.loads((Path(out) / CONFIG_FILE).read_text())
    if live is not None and result.history:
        write_live(live, result.history)
    return {
        "run_name": run_name,
        "run_dir": str(run_dir),
        "resumed": resume,
        "epochs": len(result.history),
        "best_epoch": config.get("epoch"),
        "best_val_rsum": config.get("val_rsum"),
        "model": str(out),
        "final": result.metrics,
    }
