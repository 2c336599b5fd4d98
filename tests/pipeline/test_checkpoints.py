"""pipeline.checkpoints: checkpoint files round-trip, exports hold the model only, load_model is strict."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.checkpoints import (
    CONFIG_FILE,
    LOSS_FILE,
    MODEL_FILE,
    export_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from pipeline.ray_train import resolve_model_kwargs
from setemb.losses import create_loss
from setemb.model import create_model
from tests.pipeline.test_ray_train import tiny_params


def _objects(seed: int) -> dict:
    torch.manual_seed(seed)
    kwargs = resolve_model_kwargs(tiny_params().train.model.model_dump(mode="json"), {"local_dim": 8}, {"local_dim": 6})
    model, loss_fn = create_model(**kwargs), create_loss("pcme")
    optimizer = torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return {"model": model, "loss_fn": loss_fn, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}


def test_checkpoint_round_trip_restores_every_object_and_export_keeps_the_model(tmp_path):
    saved = _objects(seed=0)
    loss = sum(p.sum() for p in saved["model"].parameters()) + sum(p.sum() for p in saved["loss_fn"].parameters())
    loss.backward()
    saved["optimizer"].step()
    saved["scheduler"].step()
    config = {"model": saved["model"].config, "loss": {"name": "pcme", "kwargs": {}}, "epoch": 3}
    state = {"epoch": 3, "best_rsum": 1.5, "best_epoch": 2, "history": [{"epoch": 3}]}
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(tmp_path / "ckpt", config=config, state=state, **saved)

    fresh = _objects(seed=1)
    assert load_checkpoint(tmp_path / "ckpt", **fresh) == state
    for name in ("model", "loss_fn"):  # the loss's own parameters (PCME's scale / shift) moved in the step above
        for a, b in zip(saved[name].state_dict().values(), fresh[name].state_dict().values(), strict=True):
            assert torch.equal(a, b)
    assert fresh["scheduler"].last_epoch == 1 and fresh["optimizer"].state_dict()["state"]  # Adam moments restored

    out = export_model(tmp_path / "ckpt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, LOSS_FILE, CONFIG_FILE])
    model, loss_fn, loaded = load_model(out)
    assert loaded == json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text()) and not model.training
    for a, b in zip(loss_fn.state_dict().values(), saved["loss_fn"].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="not a setemb checkpoint"):
        export_model(tmp_path / "export" / MODEL_FILE, tmp_path / "again")


def test_load_model_is_strict_and_names_the_keys(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    kwargs = resolve_model_kwargs(tiny_params().train.model.model_dump(mode="json"), {"local_dim": 8}, {"local_dim": 6})
    model = create_model(**kwargs)
    state = model.state_dict()
    state["image.extra_weight"] = torch.zeros(1)
    dropped = next(iter(state))
    del state[dropped]
    torch.save(state, model_dir / "model.pt")
    torch.save(create_loss("triplet").state_dict(), model_dir / "loss.pt")
    (model_dir / "config.json").write_text(
        json.dumps({"model": model.config, "loss": {"name": "triplet", "kwargs": {}}})
    )
    with pytest.raises(ValueError) as err:
        load_model(model_dir)
    assert "image.extra_weight" in str(err.value) and dropped in str(err.value)
    os.remove(model_dir / "loss.pt")
    with pytest.raises(FileNotFoundError, match="loss.pt"):
        load_model(model_dir)
