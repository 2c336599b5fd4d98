"""Training checkpoints and model exports: their files, how they are written, and ``load_model`` (no Ray needed).

Rank 0 of ``pipeline.ray_train`` writes a checkpoint every epoch (``save_checkpoint``) and exports the best model to a
plain directory (``export_model``); a resumed or restarted worker restores everything from one
(``load_checkpoint``), and the embed stage, queries and tests rebuild the model from either (``load_model``).

Checkpoint / export directory layout (``load_model`` reads either)::

    model.pt        state dict of the unwrapped SetEmbeddingModel
    loss.pt         state dict of the loss module (PCME's learnt scale / shift)
    config.json     {"model": create_model kwargs (feature dims resolved), "loss": {"name", "kwargs"},
                     "similarity": {"name", "kwargs"}, "train": TrainParams JSON, "seed", "captions_per_image",
                     "epoch", "val_rsum", "features": {"image": {...}, "text": {...}}}
    optimizer.pt, scheduler.pt, scaler.pt, state.json   (checkpoints only: what resuming needs)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.files import replace_dir, write_json_atomic
from setemb.losses import create_loss
from setemb.model import create_model

MODEL_FILE, LOSS_FILE, CONFIG_FILE = "model.pt", "loss.pt", "config.json"
STATE_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, SCALER_FILE = "state.json", "optimizer.pt", "scheduler.pt", "scaler.pt"


def write_json(path: Path, value: Any) -> None:
    """Atomic, indented, key-sorted JSON (config.json, state.json, the run's history.json)."""
    write_json_atomic(path, value, indent=2, sort_keys=True, default=float)


def export_model(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy the model of a checkpoint (``model.pt``, ``loss.pt``, ``config.json``) to a plain directory.

    Returns:
        ``out_dir``; ``load_model(out_dir)`` rebuilds the model without Ray.
    """
    src, out = Path(checkpoint_dir), Path(out_dir)
    missing = [f for f in (MODEL_FILE, LOSS_FILE, CONFIG_FILE) if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not a setemb checkpoint: missing {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    for f in (MODEL_FILE, LOSS_FILE, CONFIG_FILE):
        shutil.copy2(src / f, staging / f)
    replace_dir(staging, out)
    return out


def _load_strict(module: torch.nn.Module, state: dict[str, Any], what: str, where: Path) -> None:
    """``load_state_dict(strict=True)`` with missing / unexpected keys and shape mismatches spelled out."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{where} does not match the {what} rebuilt from its config.json:\n"
            f"  missing keys: {missing}\n  unexpected keys: {unexpected}\n  shape mismatches: {shapes}"
        )
    module.load_state_dict(state, strict=True)


def load_model(
    model_dir: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """Rebuild ``(model, loss_fn, config)`` from an export (or a checkpoint) directory, strictly; eval mode.

    Raises:
        FileNotFoundError: a file is missing. ValueError: the weights do not fit the config (keys listed).
    """
    model_dir = Path(model_dir)
    for f in (MODEL_FILE, LOSS_FILE, CONFIG_FILE):
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"no {f} in {model_dir}; train first (`dvc repro train`) or pass a model directory")
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    model = create_model(**config["model"])
    loss_fn = create_loss(config["loss"]["name"], **config["loss"]["kwargs"])
    _load_strict(model, torch.load(model_dir / MODEL_FILE, map_location="cpu", weights_only=True), "model", model_dir)
    _load_strict(loss_fn, torch.load(model_dir / LOSS_FILE, map_location="cpu", weights_only=True), "loss", model_dir)
    return model.to(device).eval(), loss_fn.to(device).eval(), config


def save_checkpoint(directory: Path, *, model, loss_fn, optimizer, scheduler, scaler, config, state) -> None:
    """Write every file of a checkpoint (module docstring) into ``directory``."""
    torch.save(model.state_dict(), directory / MODEL_FILE)
    torch.save(loss_fn.state_dict(), directory / LOSS_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    torch.save(scaler.state_dict(), directory / SCALER_FILE)
    write_json(directory / CONFIG_FILE, config)
    write_json(directory / STATE_FILE, state)


def load_checkpoint(directory: Path, *, model, loss_fn, optimizer, scheduler, scaler) -> dict[str, Any]:
    """Restore the objects in place from a checkpoint (weights strictly); returns its ``state.json``."""

    def load(name: str) -> Any:
        return torch.load(directory / name, map_location="cpu", weights_only=True)

    _load_strict(model, load(MODEL_FILE), "model", directory)
    _load_strict(loss_fn, load(LOSS_FILE), "loss", directory)
    optimizer.load_state_dict(load(OPTIMIZER_FILE))
    scheduler.load_state_dict(load(SCHEDULER_FILE))
    scaler.load_state_dict(load(SCALER_FILE))
    return json.loads((directory / STATE_FILE).read_text())
