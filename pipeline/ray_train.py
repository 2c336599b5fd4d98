"""Ray Train wiring around ``setemb.training`` (the only module that knows Ray Train; PLATFORM §5, Train V2).

``run_training`` starts (or attaches to) Ray and runs a ``TorchTrainer`` whose workers each open the feature store
themselves, train with DDP over gloo (CPU) or NCCL (GPU), and report once per epoch. Rank 0 validates on ``val``,
writes the checkpoint (model, loss, optimizer, scheduler, grad scaler, epoch, best RSUM, history, resolved config),
logs to dvclive, and exports the best model to a plain directory that ``load_model`` rebuilds without Ray (the files
of checkpoints and exports: ``pipeline.checkpoints``).

Test hook: when the environment variable ``SETEMB_TEST_FAIL_AT="epoch:step:rank"`` is set, the worker of that rank
calls ``os._exit(1)`` just before training step ``step`` (0-based, as in the non-finite loss message) of epoch
``epoch``; with ``"epoch:step:rank:hang"`` it sleeps there instead, so that a test can kill the whole run at a known
point. It fires once per run: the first firing creates ``<run_dir>/.setemb_test_fail_at`` and the hook stays off
while that file exists (Ray's worker restart and a resumed run both go past the step). Used by the reliability
tests (tests/pipeline/test_train_reliability.py); never set it otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoints import STATE_FILE, export_model, load_checkpoint, save_checkpoint, write_json
from pipeline.files import GLOVE_VECTORS, replace_dir
from pipeline.params import Params, TrainParams
from pipeline.train_console import DriverConsole, Progress, epoch_summary
from pipeline.train_data import epoch_batches, sequential_tables, streaming_tables
from setemb.feature_store import FeatureStore
from setemb.locations import exists, is_url, join, remove_tree, resolve
from setemb.losses import create_loss
from setemb.model import create_model, param_groups
from setemb.training import (
    CaptionIndex,
    ImageCaptionBatches,
    train_one_epoch,
    validate,
    warmup_cosine_schedule,
)

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
SCORE_METRIC = "val_rsum"
LOG_EVERY = 20
FAIL_AT_ENV = "SETEMB_TEST_FAIL_AT"  # test hook, see the module docstring
FAIL_AT_MARKER = ".setemb_test_fail_at"


@dataclass
class TrainResult:
    """What a training run left behind.

    Attributes:
        best_model: plain export directory of the best model (``load_model`` reads it).
        best_checkpoint: Ray checkpoint directory of the best epoch (a URL with remote storage; None in local mode:
            Ray does not persist them).
        best_rsum: best validation RSUM, None without a ``val`` split (then the best model is the last one).
        metrics: the last epoch's reported metrics.
        history: every epoch's metrics, in order (resumed runs included).
    """

    best_model: Path
    best_checkpoint: Path | str | None
    best_rsum: float | None
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ features / model
def resolve_model_kwargs(
    model: dict[str, Any], image_attrs: dict[str, Any], text_attrs: dict[str, Any]
) -> dict[str, Any]:
    """``create_model`` kwargs from ``TrainParams.model`` plus the input dims the feature store knows.

    Sets (unless given) ``image_encoder_kwargs.input_dim`` = image ``local_dim`` and, for text,
    ``text_encoder_kwargs.input_dim`` = text ``local_dim`` or, for ``bigru``, ``vocab_size`` from the store attrs.

    Raises:
        ValueError: a needed dim is neither in the params nor in the store.
    """
    kwargs = json.loads(json.dumps(model))  # deep copy of plain data
    image_kw, text_kw = kwargs.setdefault("image_encoder_kwargs", {}), kwargs.setdefault("text_encoder_kwargs", {})
    if image_attrs.get("local_dim") is None and "input_dim" not in image_kw:
        raise ValueError(
            "image features have no local_dim (token ids?); set train.model.image_encoder_kwargs.input_dim"
        )
    image_kw.setdefault("input_dim", image_attrs.get("local_dim"))
    if kwargs.get("text_encoder") == "bigru":
        if "vocab_size" not in text_kw:
            if text_attrs.get("vocab_size") is None:
                raise ValueError(
                    "the bigru text encoder needs a vocabulary size: the feature store's text attrs have no "
                    "vocab_size; set train.model.text_encoder_kwargs.vocab_size"
                )
            text_kw["vocab_size"] = int(text_attrs["vocab_size"])
    elif "input_dim" not in text_kw:
        if text_attrs.get("local_dim") is None:
            raise ValueError(
                f"text features are token ids but train.model.text_encoder={kwargs.get('text_encoder')!r} expects "
                "feature rows; use text_encoder 'bigru' or re-extract with a transformer text backbone"
            )
        text_kw["input_dim"] = int(text_attrs["local_dim"])
    return kwargs


def _init_word_vectors(model: torch.nn.Module, features: Path) -> bool:
    """Initialise a bi-GRU's word embeddings from the GloVe vectors the extract stage saved beside the vocabulary.

    The vectors are an initialisation only (fine-tuned, M§2), so they stay out of the saved model config; the trained
    embedding table travels in the state dict. Returns True when vectors were loaded.
    """
    vectors_path = features / GLOVE_VECTORS
    embedding = getattr(getattr(model.text, "encoder", None), "embedding", None)
    if not vectors_path.is_file() or not isinstance(embedding, torch.nn.Embedding):
        return False
    vectors = torch.from_numpy(np.load(vectors_path)).to(embedding.weight.dtype)
    if tuple(vectors.shape) != tuple(embedding.weight.shape):
        raise ValueError(
            f"{vectors_path} holds vectors of shape {tuple(vectors.shape)}, the bi-GRU embedding is "
            f"{tuple(embedding.weight.shape)}; set train.model.text_encoder_kwargs.word_dim to the vector width"
        )
    with torch.no_grad():
        embedding.weight.copy_(vectors)
    logger.info("bi-GRU word embeddings initialised from %s", vectors_path)
    return True


def _feature_summary(attrs: dict[str, Any]) -> dict[str, Any]:
    keys = ("backbone", "local_dim", "global_dim", "local_dtype", "grid", "max_tokens", "vocab_size", "image_transform")
    return {k: attrs.get(k) for k in keys if k in attrs}


def build_loss(train: TrainParams) -> torch.nn.Module:
    """The loss module of ``train.loss``."""
    return create_loss(train.loss.name, **train.loss.kwargs)


# ------------------------------------------------------------------------------------------------ worker helpers
def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Torch RNG seed of one (epoch, rank): token drop and dropout replay exactly after a resume."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _loss_grad_sync(params: list[torch.nn.Parameter], world_size: int):
    """All-reduce (mean) the gradients of the loss's own parameters, which DDP does not own (PCME's a, b)."""
    if world_size <= 1 or not params:
        return None
    import torch.distributed as dist

    def sync() -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # [n_loss_params]
        dist.all_reduce(flat)
        flat /= world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    return sync


def _open_live(directory: str | None, resume: bool):
    if directory is None:
        return None
    from dvclive import Live

    return Live(directory, dvcyaml=False, save_dvc_exp=False, resume=resume, report=None)


def _test_fail_at(batches, epoch: int, rank: int, run_dir: Path):
    """``batches``, or (test hook ``SETEMB_TEST_FAIL_AT``, module docstring) a wrapper that exits / hangs once."""
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return batches
    fields = spec.split(":")
    at_epoch, at_step, at_rank = (int(f) for f in fields[:3])
    action = fields[3] if len(fields) > 3 else "exit"
    if (at_epoch, at_rank) != (epoch, rank) or (run_dir / FAIL_AT_MARKER).exists():
        return batches

    def wrapped():
        for step, batch in enumerate(batches):
            if step == at_step:
                try:
                    fd = os.open(run_dir / FAIL_AT_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:  # fired already in this run
                    pass
                else:
                    os.write(fd, f"{spec} pid={os.getpid()}\n".encode())
                    os.close(fd)
                    logger.warning(
                        "%s=%s: %s at epoch %d step %d rank %d", FAIL_AT_ENV, spec, action, epoch, step, rank
                    )
                    while action == "hang":
                        time.sleep(60)
                    os._exit(1)
            yield batch

    return wrapped()


# ------------------------------------------------------------------------------------------------ the worker loop
def _optimization(
    model: torch.nn.Module, loss_fn: torch.nn.Module, train: TrainParams, steps_per_epoch: int, device: torch.device
):
    """AdamW over ``param_groups`` + the loss's parameters (no weight decay), warm-up + cosine, grad scaler (M§5)."""
    optim = train.optim
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    groups = param_groups(model, optim.lr, optim.head_lr_scale, optim.encoder_lr_scale, weight_decay=optim.weight_decay)
    if loss_params:
        groups.append({"name": "loss", "params": loss_params, "lr": optim.lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    total_steps = optim.epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(optim.warmup_epochs * steps_per_epoch))
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=optim.amp and device.type == "cuda")
    return optimizer, scheduler, scaler, loss_params


def _log_live(live: Any, epoch: int, metrics: dict[str, Any]) -> None:
    if live is None:
        return
    live.step = epoch  # exact even if a crash fell between logging and the checkpoint
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, int | float):
            live.log_metric(key, value)
    live.next_step()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: load features, build model + loss, train every remaining epoch, report each one.

    Config keys (plain JSON, built by ``run_training``): ``train`` (``TrainParams`` JSON, validated again here),
    ``features`` (store path), ``seed``, ``captions_per_image``, ``resume_from`` (checkpoint dir or None),
    ``best_model_dir``, ``run_dir`` (absolute; history.json goes there), ``local_state_dir`` (local mode: where the
    latest checkpoint is kept, since Ray does not persist it), ``dvclive_dir`` (or None), ``stop_after_epochs``
    (or None: train only up to that many epochs in this run; the schedule still spans ``optim.epochs``), ``quiet``.
    """
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    train = TrainParams.model_validate(config["train"])
    optim, seed = train.optim, int(config["seed"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # every worker streams the store itself: nothing big travels through the driver or sits in memory
    store = FeatureStore.open(config["features"])
    train_split = store["train"]
    image_table, text_table, bounds = streaming_tables(
        train_split, train.data, train.images_per_batch, int(config["captions_per_image"])
    )
    caption_index = CaptionIndex(train_split.caption_to_image, len(image_table))
    val = sequential_tables(store["val"], train.eval_block_size) if rank == 0 and "val" in store.splits else None

    torch.manual_seed(seed)
    image_attrs, text_attrs = train_split.image.attrs, train_split.text.attrs
    model = create_model(**resolve_model_kwargs(train.model.model_dump(mode="json"), image_attrs, text_attrs))
    _init_word_vectors(model, Path(config["features"]))
    model = model.to(device)
    loss_fn = build_loss(train).to(device)
    if optim.no_mining_epochs > 0 and not hasattr(loss_fn, "set_hardest_negatives"):
        raise ValueError(f"train.optim.no_mining_epochs > 0 needs a triplet loss, got loss {train.loss.name!r}")
    saved_config = {
        "model": model.config,
        "loss": {"name": train.loss.name, "kwargs": train.loss.kwargs},
        "train": train.model_dump(mode="json"),
        "seed": seed,
        "captions_per_image": config["captions_per_image"],
        "features": {
            "path": config["features"],
            "image": _feature_summary(image_attrs),
            "text": _feature_summary(text_attrs),
        },
    }

    def sampler(epoch: int) -> ImageCaptionBatches:
        return ImageCaptionBatches(
            len(image_table),
            train.images_per_batch,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=False,
            bounds=bounds,
            window_blocks=train.data.window_blocks,
        )

    steps_per_epoch = min(len(sampler(0)), train.limit_batches or len(sampler(0)))
    optimizer, scheduler, scaler, loss_params = _optimization(model, loss_fn, train, steps_per_epoch, device)
    objects = {"model": model, "loss_fn": loss_fn, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}

    state: dict[str, Any] = {"epoch": -1, "best_rsum": None, "best_epoch": None, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # Ray's restart after a failure, or a resumed run (same name and storage)
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), **objects)
    elif config.get("resume_from"):
        state = load_checkpoint(Path(config["resume_from"]), **objects)
    start_epoch = int(state["epoch"]) + 1
    channel = config.get("console") if rank == 0 else None
    if rank == 0 and start_epoch > 0:
        note = f"resuming at epoch {start_epoch} (best val RSUM so far {state['best_rsum']})"
        if channel is not None:  # the driver's console shows it (worker logs reach it only with --debug)
            channel.put_nowait({"note": note})
        else:
            logger.info("%s", note)

    ddp_model = ray.train.torch.prepare_model(model)
    after_backward = _loss_grad_sync(loss_params, world_size)
    stop = optim.epochs if config.get("stop_after_epochs") is None else min(optim.epochs, config["stop_after_epochs"])
    live = _open_live(config.get("dvclive_dir"), resume=start_epoch > 0) if rank == 0 else None
    show_bar = rank == 0 and not config.get("quiet") and sys.stderr.isatty()
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None

    for epoch in range(start_epoch, stop):
        if optim.no_mining_epochs > 0:
            loss_fn.set_hardest_negatives(epoch >= optim.no_mining_epochs)
        if hasattr(loss_fn, "set_epoch"):  # PCME++'s pseudo-positive warm-up
            loss_fn.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(seed, epoch, rank))  # token drop / dropout replay exactly after a resume
        batches = epoch_batches(
            image_table, text_table, caption_index, sampler(epoch), steps_per_epoch, train.data.prefetch_batches
        )
        if run_dir is not None:
            batches = _test_fail_at(batches, epoch, rank, run_dir)
        progress = Progress(steps_per_epoch, epoch, show_bar, channel)
        start = time.perf_counter()
        try:
            losses = train_one_epoch(
                ddp_model,
                loss_fn,
                optimizer,
                batches,
                scheduler=scheduler,
                grad_clip=optim.grad_clip,
                amp=optim.amp,
                device=device,
                epoch=epoch,
                log_every=LOG_EVERY,
                progress=progress,
                after_backward=after_backward,
                scaler=scaler,
            )
        finally:
            progress.close()
        metrics: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in losses.items()}}
        metrics["lr"] = scheduler.get_last_lr()[0]  # of the first parameter group
        metrics["epoch_time_s"] = time.perf_counter() - start
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue

        improved = True  # without a val split the last model is the one exported
        if val is not None:
            results = validate(
                model,
                *val,
                similarity=loss_fn.similarity_name,
                similarity_kwargs=loss_fn.similarity_kwargs(),
                block_size=train.eval_block_size,
                captions_per_image=config["captions_per_image"],
                batch_size=train.eval_block_size,
                device=device,
            )
            metrics.update({f"val_{k}": v for k, v in results.items()})
            improved = state["best_rsum"] is None or results["rsum"] > state["best_rsum"]
            if improved:
                state["best_rsum"], state["best_epoch"] = results["rsum"], epoch
            metrics["best_val_rsum"] = state["best_rsum"]
        state = {**state, "epoch": epoch, "history": [*state["history"], metrics]}
        similarity = {"name": loss_fn.similarity_name, "kwargs": loss_fn.similarity_kwargs()}
        ckpt_config = {**saved_config, "similarity": similarity, "epoch": epoch, "val_rsum": metrics.get("val_rsum")}
        if channel is not None:
            channel.put_nowait({"summary": metrics})
        else:  # in the driver's process (local mode): the summary line is ours to write
            logger.info("%s", epoch_summary(metrics, optim.epochs))
        _log_live(live, epoch, metrics)
        if run_dir is not None:
            write_json(run_dir / HISTORY_FILE, state["history"])
        with tempfile.TemporaryDirectory(prefix="setemb-ckpt-") as tmp:
            save_checkpoint(Path(tmp), config=ckpt_config, state=state, **objects)
            if improved and config.get("best_model_dir"):
                export_model(tmp, config["best_model_dir"])
            if config.get("local_state_dir"):  # local mode: Ray keeps no checkpoint, keep our own for resuming
                staging = Path(tempfile.mkdtemp(prefix=".local_state.", dir=run_dir))
                shutil.copytree(tmp, staging, dirs_exist_ok=True)
                replace_dir(staging, Path(config["local_state_dir"]))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    if live is not None:
        live.end()


# ------------------------------------------------------------------------------------------------------ driver
def _init_ray(address: str | None, verbose: bool) -> bool:
    """Attach to ``address`` (or ``RAY_ADDRESS``), or start a local Ray; True when this call started it.

    Worker logs reach the driver only when ``verbose`` (``--debug``): Ray Train writes several lines per worker per
    epoch ("Reporting training result ..."); the console shows ``DriverConsole``'s bar and summaries instead.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.ERROR)
        return False
    # The dashboard (loopback only) hosts the state API that Ray Train's controller polls; without it the
    # driver log fills with "Failed to query Ray Train Controller actor state" (PLATFORM §5).
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=verbose,
        logging_level=logging.ERROR,
    )
    return True


def run_training(
    params: Params,
    *,
    features: str | os.PathLike,
    storage_path: str | os.PathLike,
    run_name: str = "train",
    resume: bool = False,
    address: str | None = None,
    quiet: bool = False,
    verbose: bool = False,
    model_dir: str | os.PathLike | None = None,
    dvclive_dir: str | os.PathLike | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train ``params.train`` on the feature store ``features`` with Ray Train.

    Args:
        params: the validated params (``train``, ``seed`` and ``extract.captions_per_image`` are read).
        features: the feature store (``train`` split required, ``val`` used for model selection when present): a local
            path or an fsspec URL every node can read (``s3://bucket/features.zarr``; ``setemb.locations``).
        storage_path: Ray's storage, a local path or a URL; checkpoints go to
            ``<storage_path>/<run_name>/checkpoint_*``. With a URL the driver reads the history from the latest
            checkpoint and exports the best one itself, so no node needs another's filesystem.
        run_name: Ray run name. Without ``resume`` an existing ``<storage_path>/<run_name>`` is deleted first
            (Ray would otherwise silently resume it).
        resume: continue from the run's latest checkpoint (Ray's snapshot; in local mode our own copy).
        address: Ray cluster to attach to (else ``train.ray.address``, ``RAY_ADDRESS``, or a new local Ray).
        quiet: no progress bar and no per-epoch summary lines.
        verbose: Ray's worker logs on the driver's console too (``--debug``).
        model_dir: where the best model is exported (default ``<storage_path>/<run_name>/model``).
        dvclive_dir: dvclive directory for per-epoch metrics (None: no dvclive).
        stop_after_epochs: stop this run after that many epochs (the schedule still spans ``optim.epochs``); a
            later ``resume=True`` run continues exactly where it stopped.

    Returns:
        ``TrainResult``.

    Raises:
        FileNotFoundError: no feature store. ray.train.TrainingFailedError: a worker failed more than
        ``train.ray.max_failures`` times (e.g. with ``NonFiniteLossError``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = params.train
    features = resolve(features)
    store = FeatureStore.open(features)  # FileNotFoundError / IncompleteStoreError before any Ray work
    if "train" not in store.splits:
        raise ValueError(f"feature store {features} has no train split (has {store.splits}); extract it first")
    has_val = "val" in store.splits
    storage = resolve(storage_path)
    remote = is_url(storage)  # checkpoints in object storage: every node reaches them, no shared filesystem
    local_mode = train.ray.num_workers == 0
    if remote and local_mode:
        raise ValueError(
            f"train.ray.num_workers=0 keeps its checkpoints on this machine; use a local storage path, not {storage}"
        )
    run_location = join(storage, run_name)
    if exists(run_location) and not resume:
        logger.warning("removing the previous run at %s (pass resume=True to continue it)", run_location)
        remove_tree(run_location)
    # Our own files beside Ray's (history.json, the best-model export, the local-mode state, test markers): in the
    # run directory when it is local; with remote storage the driver rebuilds them from the checkpoints instead.
    run_dir = None if remote else Path(run_location)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None and run_dir is None:
        raise ValueError("remote storage needs a local model_dir for the exported model")
    best_dir = Path(model_dir).resolve() if model_dir is not None else run_dir / "model"
    local_state = None if run_dir is None else run_dir / "local_state"
    config = {
        "train": train.model_dump(mode="json"),
        "features": features,
        "seed": params.seed,
        "captions_per_image": params.extract.captions_per_image,
        "resume_from": str(local_state) if local_mode and resume and local_state.is_dir() else None,
        "best_model_dir": None if remote else str(best_dir),
        "run_dir": None if run_dir is None else str(run_dir),
        "local_state_dir": str(local_state) if local_mode else None,
        "dvclive_dir": None if dvclive_dir is None else str(Path(dvclive_dir).resolve()),
        "stop_after_epochs": stop_after_epochs,
        "quiet": quiet,
    }
    scaling = ScalingConfig(
        num_workers=train.ray.num_workers,
        use_gpu=train.ray.use_gpu,
        resources_per_worker=None if local_mode else {"CPU": train.ray.cpus_per_worker},
    )
    # num_to_keep=2 by val_rsum keeps the 2 best; Ray V2 never deletes the latest checkpoint, so resuming works too.
    checkpoints = CheckpointConfig(
        num_to_keep=2,
        checkpoint_score_attribute=SCORE_METRIC if has_val else None,
        checkpoint_score_order="max",
    )
    run_config = RunConfig(
        name=run_name,
        storage_path=str(storage),
        checkpoint_config=checkpoints,
        failure_config=FailureConfig(max_failures=train.ray.max_failures),
    )
    started = False if local_mode else _init_ray(address or train.ray.address, verbose)
    console = None
    try:
        if not local_mode and not quiet:
            console = DriverConsole(train.optim.epochs, bar=sys.stderr.isatty())
            config["console"] = console.queue
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=config, scaling_config=scaling, run_config=run_config
        )
        result = trainer.fit()
    finally:
        if console is not None:
            console.close()
        if started:
            import ray

            ray.shutdown()

    best_checkpoint = None
    if run_dir is not None:
        history_file = run_dir / HISTORY_FILE
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
    else:  # remote storage: the latest checkpoint holds the whole history
        with result.checkpoint.as_directory() as latest:
            history = json.loads((Path(latest) / STATE_FILE).read_text())["history"]
    if not local_mode:
        best = result.get_best_checkpoint(SCORE_METRIC, "max") if has_val else result.checkpoint
        if best is not None and remote:
            with best.as_directory() as directory:
                export_model(directory, best_dir)
            best_checkpoint = f"{storage.split('://', 1)[0]}://{best.path.lstrip('/')}"  # Ray gives a bucket path
        elif best is not None:
            best_checkpoint = Path(best.path)
    rsums = [h["val_rsum"] for h in history if "val_rsum" in h]
    return TrainResult(
        best_model=best_dir,
        best_checkpoint=best_checkpoint,
        best_rsum=max(rsums) if rsums else None,
        metrics=dict(result.metrics or (history[-1] if history else {})),
        history=history,
    )
