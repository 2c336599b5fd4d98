"""Framework-free training: in-memory feature tables, the P-images-plus-all-captions batch sampler (M§4.1), one epoch
of optimisation, validation by recall@K, and the warm-up + cosine schedule (M§5).

Nothing here knows Ray: ``pipeline/ray_train.py`` wraps ``train_one_epoch`` and adds DDP, checkpoints and reporting.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from setemb.metrics import recall_at_k
from setemb.similarity import score
from setemb.streaming import RaggedTable, StreamingTable, block_shuffled_order

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor | None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message names the epoch and the first bad step."""


# ------------------------------------------------------------------------------------------------- feature tables
@dataclass
class FeatureTable(RaggedTable):
    """The ragged features of one modality of one split, in RAM.

    Attributes:
        local: ``[R, D]`` float rows (any float dtype, float16 in stores), or ``[R]`` integer token ids.
        starts: ``[S]`` int first row of item i in ``local``.
        lengths: ``[S]`` int number of rows of item i (0 allowed: an all-False mask row).
        global_: ``[S, Dg]`` float global features, or None when the backbone has none (glove).
    """

    local: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    global_: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.local = np.asarray(self.local)
        self.starts = np.asarray(self.starts, dtype=np.int64)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.local.ndim not in (1, 2):
            raise ValueError(f"local must be [R, D] float or [R] token ids, got shape {self.local.shape}")
        if self.local.ndim == 1 and not np.issubdtype(self.local.dtype, np.integer):
            raise ValueError(f"1-D local rows must be integer token ids, got dtype {self.local.dtype}")
        (S,) = self.lengths.shape
        if self.starts.shape != (S,):
            raise ValueError(f"starts must be [{S}] like lengths, got {self.starts.shape}")
        if S and ((self.lengths < 0).any() or (self.starts < 0).any()):
            raise ValueError("starts and lengths must be non-negative")
        if S and (self.starts + self.lengths).max() > len(self.local):
            raise ValueError(
                f"starts + lengths reach row {(self.starts + self.lengths).max()}, local has {len(self.local)}"
            )
        if self.global_ is not None:
            self.global_ = np.asarray(self.global_)
            if self.global_.ndim != 2 or len(self.global_) != S:
                raise ValueError(f"global_ must be [{S}, Dg], got {self.global_.shape}")

    def gather(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Padded batch of items.

        Args:
            indices: B item indices.

        Returns:
            ``{"local": [B, N, D] float32 (or [B, N] int64 ids, padded with 0), "global": [B, Dg] float32 or None,
            "mask": [B, N] bool (True = valid)}`` with ``N = max(1, longest item)``; padded rows are zeros.
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got range [{idx.min()}, {idx.max()}]")
        lens = self.lengths[idx]  # [B]
        B, N = len(idx), max(1, int(lens.max(initial=0)))
        pos = np.arange(N)
        mask = pos[None, :] < lens[:, None]  # [B, N]
        rows = (self.starts[idx][:, None] + pos[None, :])[mask]  # [sum(lens)]
        values = self.local[rows]
        out_dtype = np.int64 if self.is_tokens else np.float32
        padded = np.zeros((B, N, *values.shape[1:]), dtype=out_dtype)  # [B, N, D] or [B, N]
        padded[mask] = values
        glob = None if self.global_ is None else torch.from_numpy(self.global_[idx].astype(np.float32))
        return {"local": torch.from_numpy(padded), "global": glob, "mask": torch.from_numpy(mask)}


# ------------------------------------------------------------------------------------------------------ batching
class ImageCaptionBatches:
    """Image-index batches of P images for one epoch and one rank (M§4.1: a batch is P images + all their captions).

    The order is a permutation drawn from ``(seed, epoch)`` only, so it is the same in every process and after a
    resume. Batch ``b`` of rank ``r`` is chunk ``b * world_size + r`` of that permutation, so ranks read disjoint
    images and every rank gets ``len(self)`` batches (DDP needs equal step counts).

    Args:
        n_images: images in the split.
        images_per_batch: P.
        seed, epoch: the permutation's seed.
        rank, world_size: this worker's shard.
        drop_last: True: ``n_images // (P * world_size)`` batches of exactly P images, the remainder is left out.
            False: ``ceil(n_images / (P * world_size))`` batches per rank, every image used exactly once, batch sizes
            balanced (they differ by at most 1, all <= P).
        bounds: block boundaries of the images in the store (``setemb.streaming.block_bounds``); with them the
            order is ``block_shuffled_order`` (blocks shuffled, items shuffled within windows of ``window_blocks``
            blocks), so a streaming reader touches a bounded set of blocks at a time. None: a full permutation.
        window_blocks: blocks per shuffle window (with ``bounds``).
    """

    def __init__(
        self,
        n_images: int,
        images_per_batch: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        bounds: np.ndarray | None = None,
        window_blocks: int = 1,
    ) -> None:
        if bounds is not None and (len(bounds) < 1 or int(bounds[-1]) != n_images):
            raise ValueError(f"bounds must end at n_images={n_images}, got {None if not len(bounds) else bounds[-1]}")
        if images_per_batch < 1:
            raise ValueError(f"images_per_batch must be >= 1, got {images_per_batch}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        per_step = images_per_batch * world_size
        if drop_last:
            self.num_batches = n_images // per_step
        else:
            self.num_batches = math.ceil(n_images / per_step)
        if self.num_batches == 0 or n_images < world_size:
            raise ValueError(
                f"{n_images} images give no batch of {images_per_batch} images on each of {world_size} workers "
                f"(drop_last={drop_last}); lower images_per_batch or the number of workers"
            )
        self.n_images, self.images_per_batch = n_images, images_per_batch
        self.seed, self.epoch, self.rank, self.world_size, self.drop_last = seed, epoch, rank, world_size, drop_last
        self.bounds, self.window_blocks = bounds, window_blocks

    def __len__(self) -> int:
        return self.num_batches

    def permutation(self) -> np.ndarray:
        """The epoch's image order, ``[n_images]``, the same on every rank."""
        if self.bounds is not None:
            return block_shuffled_order(self.bounds, window_blocks=self.window_blocks, seed=self.seed, epoch=self.epoch)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_images)

    def __iter__(self) -> Iterator[np.ndarray]:
        perm = self.permutation()
        chunks_total = self.num_batches * self.world_size
        if self.drop_last:
            chunks = perm[: chunks_total * self.images_per_batch].reshape(chunks_total, self.images_per_batch)
        else:
            chunks = np.array_split(perm, chunks_total)
        for b in range(self.num_batches):
            yield np.asarray(chunks[b * self.world_size + self.rank], dtype=np.int64)


class CaptionIndex:
    """Captions of each image, precomputed once from ``caption_to_image`` (a CSR index).

    Args:
        caption_to_image: ``[C_total]`` int image row of each caption.
        n_images: number of images (defaults to ``max + 1``).
    """

    def __init__(self, caption_to_image: np.ndarray | Sequence[int], n_images: int | None = None) -> None:
        c2i = np.asarray(caption_to_image, dtype=np.int64)
        if c2i.ndim != 1:
            raise ValueError(f"caption_to_image must be 1-D [C_total], got shape {c2i.shape}")
        n = int(c2i.max(initial=-1)) + 1 if n_images is None else n_images
        if len(c2i) and (c2i.min() < 0 or c2i.max() >= n):
            raise ValueError(f"caption_to_image values must lie in [0, {n}), got [{c2i.min()}, {c2i.max()}]")
        self.caption_to_image = c2i
        self.order = np.argsort(c2i, kind="stable")  # captions grouped by image, id order inside
        counts = np.bincount(c2i, minlength=n)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [n + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def captions_of(self, image_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Captions of ``image_indices`` [P], grouped by image in batch order.

        Returns:
            caption rows ``[C]`` and their image's position in the batch ``[C]`` (values in ``0..P-1``).
        """
        lo, hi = self.offsets[image_indices], self.offsets[image_indices + 1]
        counts = hi - lo  # [P]
        local = np.repeat(np.arange(len(image_indices)), counts)  # [C]
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # [C]
        return self.order[np.repeat(lo, counts) + within], local


def make_batch(
    image_table: FeatureTable | StreamingTable,
    text_table: FeatureTable | StreamingTable,
    caption_to_image: np.ndarray | CaptionIndex,
    image_indices: np.ndarray | Sequence[int],
) -> tuple[Batch, Batch, Tensor]:
    """Collate P images and ALL their captions (M§4.1).

    Args:
        image_table, text_table: the split's features.
        caption_to_image: ``[C_total]`` image row of each caption, or a ``CaptionIndex`` built from it once (pass the
            index in loops: building it sorts all captions).
        image_indices: ``[P]`` image rows.

    Returns:
        image batch (``FeatureTable.gather``), text batch of the C captions of those images (grouped by image, in
        batch order), and ``caption_to_image_local [C]`` long: the batch position (``0..P-1``) of each caption's image.
    """
    index = caption_to_image if isinstance(caption_to_image, CaptionIndex) else CaptionIndex(caption_to_image)
    images = np.asarray(image_indices, dtype=np.int64)
    if images.ndim != 1 or len(images) == 0:
        raise ValueError(f"image_indices must be a non-empty 1-D array, got shape {images.shape}")
    captions, local = index.captions_of(images)
    return image_table.gather(images), text_table.gather(captions), torch.from_numpy(local)


# ------------------------------------------------------------------------------------------------------ training
def _to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on ``device``; float features become float32 there (streamed batches arrive in the store's float16:
    the conversion is exact, and moving half the bytes is cheaper)."""
    return {
        k: None if v is None else v.to(device, torch.float32 if v.is_floating_point() else v.dtype, non_blocking=True)
        for k, v in batch.items()
    }


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Batch, Batch, Tensor]],
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    amp: bool = False,
    device: torch.device | str = "cpu",
    epoch: int = 0,
    log_every: int = 50,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    after_backward: Callable[[], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``batches``: forward, loss, backward, clip, step (M§5: AdamW, grad-clip by global norm after
    unscale, per-iteration schedule).

    Loss components are summed on the device; the host syncs only every ``log_every`` steps and at the end, which is
    also when non-finiteness is checked (a device tensor keeps the first bad step, so the error names it even though
    it is read later; parameters updated after that step are garbage, the error aborts the epoch).

    Args:
        model: ``forward(image_batch, text_batch) -> (SetOutput, SetOutput)`` (possibly DDP-wrapped).
        loss_fn: ``forward(img, txt, caption_to_image [C] long) -> {"loss": ..., components}``.
        optimizer: holds the model's and the loss's trainable parameters.
        batches: ``(image_batch, text_batch, caption_to_image_local)`` from ``make_batch`` (CPU tensors are fine).
        scheduler: stepped after every optimiser step (per iteration).
        grad_clip: max global L2 norm of all optimised gradients; None disables clipping.
        amp: float16 autocast + GradScaler, used only when ``device`` is CUDA (CPU always trains in float32).
        device: where the model lives.
        epoch: for messages.
        log_every: steps between host syncs (progress callback and the non-finite check).
        progress: called as ``progress(steps_done, running_means)`` at every sync.
        after_backward: called after each backward, before clipping (e.g. all-reduce of gradients DDP does not own).
        scaler: a GradScaler to reuse across epochs (its state belongs in checkpoints); created when None and AMP is on.

    Returns:
        Mean of every loss component over the epoch (``"loss"`` included) and ``"steps"``.

    Raises:
        NonFiniteLossError: the loss was NaN/inf at some step (named in the message).
        ValueError: ``batches`` was empty.
    """
    device = torch.device(device)
    use_amp = bool(amp) and device.type == "cuda"
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    params = _optimizer_params(optimizer)
    model.train()
    loss_fn.train()
    sums: dict[str, Tensor] = {}
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    step = -1

    def sync(steps_done: int) -> dict[str, float]:
        bad = int(first_bad)  # host sync
        if bad >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} step {bad}: check the learning rate, the inputs (NaN features?) "
                f"and amp; parameters after that step are not usable"
            )
        keys = list(sums)
        values = (torch.stack([sums[k] for k in keys]) / steps_done).tolist() if keys else []
        return dict(zip(keys, values, strict=True))

    for step, (image_batch, text_batch, caption_to_image) in enumerate(batches):
        optimizer.zero_grad(set_to_none=True)  # before the forward: last step's gradients are not kept alongside it
        image_batch, text_batch = _to_device(image_batch, device), _to_device(text_batch, device)
        caption_to_image = caption_to_image.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            img, txt = model(image_batch, text_batch)
            losses = loss_fn(img, txt, caption_to_image)
        loss = losses["loss"]
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step), first_bad)
        for key, value in losses.items():
            value = torch.as_tensor(value, device=device).detach().float()
            sums[key] = sums[key] + value if key in sums else value.clone()
        scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if (step + 1) % log_every == 0:
            means = sync(step + 1)
            if progress is not None:
                progress(step + 1, means)
    if step < 0:
        raise ValueError(f"epoch {epoch}: no batches to train on")
    means = sync(step + 1)
    if progress is not None and (step + 1) % log_every:
        progress(step + 1, means)
    return {**means, "steps": float(step + 1)}


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class EncodedTable:
    """A whole table run through one tower.

    Attributes:
        embeddings: ``[S, K, D]`` float32.
        attention: ``[S, K, N]`` float32 with ``N = table.max_length`` (zero beyond each item's length), or None when
            the head returns none.
    """

    embeddings: Tensor
    attention: Tensor | None = None


@torch.no_grad()
def encode_table(
    tower_fn: Callable[[Batch], Any],
    table: FeatureTable | StreamingTable,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    out_device: torch.device | str = "cpu",
) -> EncodedTable:
    """Embed every item of ``table`` in batches of ``batch_size`` (no grad; the caller sets eval mode).

    Args:
        tower_fn: ``batch -> SetOutput`` (``embeddings [B, K, D]``, optional ``attention [B, K, N]``).
        table: the items, in order.
        batch_size: items per forward.
        device: where the tower runs; out_device: where the results are gathered.

    Returns:
        ``EncodedTable`` with ``embeddings [S, K, D]`` and ``attention [S, K, N_max]`` (or None).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    S = len(table)
    if S == 0:
        raise ValueError("cannot encode an empty table")
    device, out_device = torch.device(device), torch.device(out_device)
    N_max = table.max_length
    embeddings: list[Tensor] = []
    attention: list[Tensor] | None = []
    for lo in range(0, S, batch_size):
        batch = _to_device(table.gather(np.arange(lo, min(S, lo + batch_size))), device)
        out = tower_fn(batch)
        embeddings.append(out.embeddings.float().to(out_device))
        if attention is not None and getattr(out, "attention", None) is not None:
            att = out.attention.float()  # [B, K, N]
            att = nn.functional.pad(att, (0, N_max - att.shape[-1]))  # [B, K, N_max]
            attention.append(att.to(out_device))
        else:
            attention = None
    return EncodedTable(torch.cat(embeddings), None if attention is None else torch.cat(attention))


def image_tower(model: nn.Module) -> Callable[[Batch], Any]:
    """``batch -> SetOutput`` of the model's image side (``SetEmbeddingModel.encode_image``), for ``encode_table``."""
    return lambda batch: model.encode_image(batch["local"], batch.get("global"), batch.get("mask"))


def text_tower(model: nn.Module) -> Callable[[Batch], Any]:
    """``batch -> SetOutput`` of the model's text side (``SetEmbeddingModel.encode_text``), for ``encode_table``."""
    return lambda batch: model.encode_text(batch["local"], batch.get("global"), batch.get("mask"))


def _image_major(caption_to_image: np.ndarray, n_images: int, captions_per_image: int) -> np.ndarray:
    """Caption order putting caption j of image i at ``i * cpi + j`` (what ``recall_at_k`` expects)."""
    c2i = np.asarray(caption_to_image, dtype=np.int64)
    counts = np.bincount(c2i, minlength=n_images)
    if len(counts) != n_images or (counts != captions_per_image).any():
        bad = np.flatnonzero(counts != captions_per_image)[:5]
        raise ValueError(
            f"validation needs exactly {captions_per_image} captions per image; images {bad.tolist()} have "
            f"{counts[bad].tolist()} (caption_to_image of length {len(c2i)} for {n_images} images)"
        )
    return np.argsort(c2i, kind="stable")


def validate(
    model: nn.Module,
    image_table: FeatureTable | StreamingTable,
    text_table: FeatureTable | StreamingTable,
    caption_to_image: np.ndarray,
    *,
    similarity: str | Callable[..., Tensor],
    similarity_kwargs: dict[str, Any] | None = None,
    block_size: int = 256,
    captions_per_image: int = 5,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Recall@K of the model on a split (M§6): encode both sides, score every image against every caption.

    Args:
        model: the unwrapped ``SetEmbeddingModel`` (not the DDP wrapper: only rank 0 validates).
        image_table, text_table: the split's features; caption_to_image: ``[C]`` image row of each caption.
        similarity: name in ``setemb.similarity`` or a callable, as trained (``loss_fn.similarity_name``).
        similarity_kwargs: its kwargs (``loss_fn.similarity_kwargs()``).
        block_size: image rows per scoring tile.
        captions_per_image: cpi; every image must have exactly that many captions.
        batch_size: items per forward while encoding.
        device: where the model lives.

    Returns:
        ``setemb.metrics.recall_at_k``'s dict (``i2t_r1`` ... ``rsum``).
    """
    order = _image_major(caption_to_image, len(image_table), captions_per_image)
    was_training = model.training
    model.eval()
    try:
        img = encode_table(image_tower(model), image_table, batch_size, device=device, out_device=device)
        txt = encode_table(text_tower(model), text_table, batch_size, device=device, out_device=device)
    finally:
        model.train(was_training)
    txt_emb = txt.embeddings[torch.from_numpy(order).to(txt.embeddings.device)]  # [C, L, D] image-major
    with torch.no_grad():
        sims = score(img.embeddings, txt_emb, similarity=similarity, block_size=block_size, **(similarity_kwargs or {}))
    return recall_at_k(sims.float().cpu(), captions_per_image=captions_per_image)


# ------------------------------------------------------------------------------------------------------ schedule
def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0, stepped once per iteration (M§5, DivE code).

    The factor at step s is ``(s + 1) / warmup_steps`` for ``s < warmup_steps``, then
    ``0.5 * (1 + cos(pi * (s - warmup_steps) / (total_steps - warmup_steps)))``, and 0 from ``total_steps`` on.

    Args:
        optimizer: its groups' ``lr`` are the peak rates.
        warmup_steps: iterations of linear warm-up (0: none).
        total_steps: iterations of the whole run.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if s >= total_steps:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * (s - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
