"""Tests of setemb.training: feature tables, the P-images + all-captions sampler, one epoch, validation, schedule."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from setemb.heads import SetOutput
from setemb.losses import create_loss
from setemb.model import create_model, param_groups
from setemb.training import (
    CaptionIndex,
    FeatureTable,
    ImageCaptionBatches,
    NonFiniteLossError,
    encode_table,
    image_tower,
    make_batch,
    train_one_epoch,
    validate,
    warmup_cosine_schedule,
)

DEVICE = torch.device(os.environ.get("SETEMB_TEST_DEVICE", "cpu"))


# ------------------------------------------------------------------------------------------------------ fixtures
def ragged_table(lengths, D=4, Dg=3, seed=0, dtype=np.float16) -> FeatureTable:
    """Rows of item i are i*100 + row + col/10 (recognisable); stored with a gap between items like the store."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])  # one unused row between items
    local = np.zeros((int(lengths.sum() + len(lengths)), D), dtype=dtype)
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        for r in range(n):
            local[s + r] = i * 10 + r + np.arange(D) / 10
    return FeatureTable(local, starts, lengths, rng.normal(size=(len(lengths), Dg)).astype(dtype))


def synthetic_split(n_images=24, cpi=2, N=5, D=8, Dt=6, seed=0):
    """Images with N local rows; each caption is a noisy linear map of its image's mean feature (learnable)."""
    rng = np.random.default_rng(seed)
    img_local = rng.normal(size=(n_images * N, D)).astype(np.float32)
    img_tab = FeatureTable(img_local, np.arange(n_images) * N, np.full(n_images, N), None)
    mean = img_local.reshape(n_images, N, D).mean(1)
    W = rng.normal(size=(D, Dt))
    c2i = rng.permutation(np.repeat(np.arange(n_images), cpi))  # captions in shuffled order
    lengths = rng.integers(2, 5, size=len(c2i))
    rows = [
        (mean[i] @ W)[None] + 0.1 * rng.normal(size=(n, Dt)) for i, n in zip(c2i, lengths, strict=True)
    ]  # [n_c, Dt] each
    txt_local = np.concatenate(rows).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return img_tab, FeatureTable(txt_local, starts, lengths, None), c2i


def tiny_model(D=8, Dt=6, seed=0):
    torch.manual_seed(seed)
    return create_model(
        embed_dim=16,
        num_embeddings=2,
        head="slot",
        image_encoder="grid",
        image_encoder_kwargs={"input_dim": D},
        text_encoder="token",
        text_encoder_kwargs={"input_dim": Dt},
    ).to(DEVICE)


def epoch_batches(img_tab, txt_tab, c2i, P, seed, epoch):
    index = CaptionIndex(c2i, len(img_tab))
    return [
        make_batch(img_tab, txt_tab, index, b) for b in ImageCaptionBatches(len(img_tab), P, seed=seed, epoch=epoch)
    ]


# --------------------------------------------------------------------------------------------------- FeatureTable
def test_gather_pads_with_zeros_and_masks_valid_rows():
    tab = ragged_table([2, 0, 3])
    out = tab.gather([2, 0, 1])
    B, N, D = out["local"].shape
    assert (B, N, D) == (3, 3, 4) and out["local"].dtype == torch.float32
    assert out["mask"].tolist() == [[True, True, True], [True, True, False], [False, False, False]]
    for b, (item, n) in enumerate([(2, 3), (0, 2), (1, 0)]):
        for r in range(n):
            expected = torch.tensor(item * 10 + r + np.arange(4) / 10, dtype=torch.float16).float()
            assert torch.equal(out["local"][b, r], expected)
        assert not out["local"][b, n:].any()
    assert torch.equal(out["global"], torch.from_numpy(tab.global_[[2, 0, 1]].astype(np.float32)))
    assert out["global"].dtype == torch.float32


def test_gather_token_ids_and_empty_items():
    tab = FeatureTable(np.array([5, 6, 7, 9], dtype=np.int32), np.array([0, 3, 4]), np.array([3, 0, 0]))
    out = tab.gather([1, 0])
    assert out["local"].dtype == torch.int64 and out["local"].tolist() == [[0, 0, 0], [5, 6, 7]]
    assert out["mask"].tolist() == [[False] * 3, [True] * 3]
    assert out["global"] is None
    empty = tab.gather([1, 2])  # every item empty: N = 1, nothing valid
    assert empty["local"].shape == (2, 1) and not empty["mask"].any()


def test_feature_table_rejects_inconsistent_arrays():
    with pytest.raises(ValueError, match="starts \\+ lengths"):
        FeatureTable(np.zeros((4, 2)), np.array([0, 3]), np.array([2, 2]))
    with pytest.raises(ValueError, match="global_"):
        FeatureTable(np.zeros((4, 2)), np.array([0, 2]), np.array([2, 2]), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="indices"):
        ragged_table([1, 1]).gather([2])


# -------------------------------------------------------------------------------------------------------- sampler
@settings(max_examples=40, deadline=None)
@given(
    n_images=st.integers(1, 60),
    P=st.integers(2, 9),
    world_size=st.integers(1, 4),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 100),
)
def test_batches_cover_images_once_across_ranks(n_images, P, world_size, drop_last, seed, epoch):
    def shard(rank):
        return list(
            ImageCaptionBatches(
                n_images, P, seed=seed, epoch=epoch, rank=rank, world_size=world_size, drop_last=drop_last
            )
        )

    expected_batches = n_images // (P * world_size) if drop_last else math.ceil(n_images / (P * world_size))
    if expected_batches == 0 or n_images < world_size:
        with pytest.raises(ValueError, match="no batch"):
            shard(0)
        return
    shards = [shard(r) for r in range(world_size)]
    assert [len(s) for s in shards] == [expected_batches] * world_size  # DDP: equal step counts
    seen = np.concatenate([b for s in shards for b in s])
    assert len(seen) == len(set(seen.tolist()))  # disjoint across batches and ranks
    if drop_last:
        assert all(len(b) == P for s in shards for b in s)
        assert len(seen) == expected_batches * P * world_size
    else:
        assert sorted(seen.tolist()) == list(range(n_images))  # every image exactly once
        sizes = [len(b) for s in shards for b in s]
        assert max(sizes) <= P and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_batches_are_deterministic_per_seed_and_epoch():
    def order(seed, epoch, rank=0):
        return np.concatenate(list(ImageCaptionBatches(50, 5, seed=seed, epoch=epoch, rank=rank, world_size=2)))

    assert np.array_equal(order(3, 7), order(3, 7))
    assert not np.array_equal(order(3, 7), order(3, 8))
    assert not np.array_equal(order(3, 7), order(4, 7))
    assert not np.array_equal(order(3, 7, rank=0), order(3, 7, rank=1))


def test_make_batch_holds_all_captions_of_its_images():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=10)
    c2i = rng.permutation(np.repeat(np.arange(10), counts))
    img_tab = ragged_table(np.full(10, 2))
    txt_tab = ragged_table(np.arange(len(c2i)) % 3 + 1, D=2, Dg=2)
    images = np.array([7, 2, 4])
    img_b, txt_b, local = make_batch(img_tab, txt_tab, c2i, images)
    assert img_b["local"].shape[0] == 3 and local.dtype == torch.int64
    C = int(counts[images].sum())
    assert txt_b["local"].shape[0] == C and local.shape == (C,)
    # recover which captions were gathered from their (unique) global features
    gathered = [
        int(np.flatnonzero((txt_tab.global_.astype(np.float32) == g.numpy()).all(1))[0]) for g in txt_b["global"]
    ]
    assert sorted(gathered) == sorted(np.flatnonzero(np.isin(c2i, images)).tolist())
    assert (c2i[gathered] == images[local.numpy()]).all()
    assert (np.diff(local.numpy()) >= 0).all()  # grouped by image, in batch order
    with pytest.raises(ValueError, match="caption_to_image values"):
        CaptionIndex(np.array([0, 5]), n_images=3)


# ------------------------------------------------------------------------------------------------------ training
def test_train_one_epoch_reduces_the_loss():
    img_tab, txt_tab, c2i = synthetic_split()
    model = tiny_model()
    loss_fn = create_loss("triplet", similarity="smooth_chamfer", margin=0.2).to(DEVICE)
    optimizer = torch.optim.AdamW(param_groups(model, 3e-3) + [{"params": list(loss_fn.parameters())}], lr=3e-3)
    history = []
    for epoch in range(6):
        batches = epoch_batches(img_tab, txt_tab, c2i, P=8, seed=0, epoch=epoch)
        out = train_one_epoch(
            model, loss_fn, optimizer, batches, grad_clip=1.0, device=DEVICE, epoch=epoch, log_every=2
        )
        assert out["steps"] == 3.0 and set(out) >= {"loss", "triplet", "steps"}
        history.append(out["loss"])
    assert all(math.isfinite(h) for h in history)
    assert history[-1] < 0.7 * history[0], history


def test_train_one_epoch_reports_progress_and_steps_the_schedule_per_iteration():
    img_tab, txt_tab, c2i = synthetic_split()
    model = tiny_model()
    loss_fn = create_loss("triplet", similarity="chamfer")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = warmup_cosine_schedule(optimizer, 2, 10)
    calls = []
    batches = epoch_batches(img_tab, txt_tab, c2i, P=8, seed=1, epoch=0)
    out = train_one_epoch(
        model,
        loss_fn,
        optimizer,
        batches,
        scheduler=scheduler,
        device=DEVICE,
        log_every=2,
        progress=lambda steps, means: calls.append((steps, means["loss"])),
    )
    assert scheduler.last_epoch == 3
    assert [c[0] for c in calls] == [2, 3]
    assert calls[-1][1] == pytest.approx(out["loss"])


def test_grad_clip_bounds_the_update():
    img_tab, txt_tab, c2i = synthetic_split()
    model = tiny_model()
    loss_fn = create_loss("triplet", similarity="chamfer")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = epoch_batches(img_tab, txt_tab, c2i, P=8, seed=0, epoch=0)[:1]
    train_one_epoch(model, loss_fn, optimizer, batch, grad_clip=1e-3, device=DEVICE)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 * (1 + 1e-4)


def test_non_finite_loss_names_epoch_and_first_bad_step():
    img_tab, txt_tab, c2i = synthetic_split()
    model = tiny_model()
    loss_fn = create_loss("triplet", similarity="chamfer")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = epoch_batches(img_tab, txt_tab, c2i, P=4, seed=0, epoch=0)  # 6 batches
    for step in (2, 4):
        batches[step][0]["local"][0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch 3 step 2"):
        train_one_epoch(model, loss_fn, optimizer, batches, device=DEVICE, epoch=3, log_every=100)


def test_empty_epoch_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="no batches"):
        train_one_epoch(model, create_loss("triplet"), torch.optim.SGD(model.parameters(), lr=0.1), [], device=DEVICE)


# ---------------------------------------------------------------------------------------------------- evaluation
class _GlobalModel(nn.Module):
    """Stand-in: the set is the (normalised) global feature, so captions carrying their image's global match it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def _encode(self, local, global_, mask):
        return SetOutput(nn.functional.normalize(global_ * self.w, dim=-1)[:, None])  # [B, 1, D]

    encode_image = encode_text = _encode


def test_validate_orders_captions_image_major():
    rng = np.random.default_rng(0)
    n, cpi, Dg = 6, 3, 5
    g = rng.normal(size=(n, Dg)).astype(np.float32)
    c2i = rng.permutation(np.repeat(np.arange(n), cpi))
    img_tab = FeatureTable(np.zeros((n, 2), np.float32), np.arange(n), np.ones(n), g)
    txt_tab = FeatureTable(np.zeros((n * cpi, 2), np.float32), np.arange(n * cpi), np.ones(n * cpi), g[c2i])
    model = _GlobalModel().train()
    metrics = validate(model, img_tab, txt_tab, c2i, similarity="chamfer", captions_per_image=cpi, batch_size=4)
    assert metrics["rsum"] == pytest.approx(600.0)
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="exactly 3 captions per image"):
        validate(model, img_tab, txt_tab, c2i[:-1], similarity="chamfer", captions_per_image=cpi)


def test_encode_table_pads_attention_to_the_longest_item():
    img_tab, txt_tab, c2i = synthetic_split()
    model = tiny_model().eval()
    tab = FeatureTable(img_tab.local, img_tab.starts, np.arange(len(img_tab)) % 5 + 1, None)
    enc = encode_table(image_tower(model), tab, batch_size=4, device=DEVICE)
    assert enc.embeddings.shape == (len(tab), 2, 16)
    batch = tab.gather(np.arange(len(tab)))
    with torch.no_grad():
        full = model.encode_image(batch["local"].to(DEVICE), None, batch["mask"].to(DEVICE))
    torch.testing.assert_close(enc.embeddings, full.embeddings.cpu(), rtol=1e-5, atol=1e-5)
    if full.attention is not None:
        assert enc.attention.shape == (len(tab), 2, 5)
        torch.testing.assert_close(enc.attention, full.attention.cpu(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ schedule
def test_warmup_cosine_schedule_shape():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(24):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear warm-up to the peak
    assert lrs[4] == pytest.approx(2.0)  # cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[4:20], lrs[5:20], strict=False))  # then strictly decreasing
    assert lrs[12] == pytest.approx(1.0)  # half-way through the cosine
    assert lrs[19] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lrs[20:] == [0.0] * 4
    with pytest.raises(ValueError):
        warmup_cosine_schedule(optimizer, warmup_steps=5, total_steps=4)
