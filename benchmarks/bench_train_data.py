"""Benchmark the streaming training data path at COCO-BUTD scale: worker memory and throughput against the bare step.

Builds (once, under ``--dir``) a synthetic feature store shaped like COCO's BUTD precomp train split — 113,287
images x 36 regions x 2,048 float16 (+ a 2,048-d global feature) and 566,435 captions of GloVe token ids (5 per
image, 8-20 tokens), about 16 GB on disk at ``--scale 1`` — then runs a Ray Train job on ``--workers`` CPU workers
(``--use-gpu`` on a GPU node) that, on every worker:

* builds the training model (region encoder + bi-GRU + DivE slot heads, ``train.model`` of params.yaml otherwise)
  and records its resident memory (the idle worker);
* ``bare``: trains ``--steps`` steps on one in-memory batch of random tensors of the same shapes (the floor: no data
  path at all);
* ``stream``: trains ``--steps`` DDP steps on batches streamed from the store exactly as ``stages.train`` reads them
  (``pipeline.train_data.streaming_tables`` + ``epoch_batches``: block-shuffled order, block cache, read-ahead);

sampling the worker's RSS every 20 ms in both. Prints per worker: peak RSS above the idle worker in each phase (the
model step's own activations and optimizer state are in both; the difference is the data path), batches/s of both
paths and their ratio (stream / bare; the goal is >= 0.9: the loader is never the bottleneck), the blocks read and
the block caches' peak resident bytes. Both phases run ``setemb.training.train_one_epoch``, the step of
``stages.train``. "Idle" is the worker after torch is imported, the store opened and the model (DDP-wrapped), loss
and optimizer built, before any step or read: gradients, AdamW state, activations and the allocator's retained
pages count above it in both phases.
With ``--ray-data N`` it also reads N images without a model, once through ``epoch_batches`` and once through Ray
Data (``map_batches`` over the same blocks + ``iter_torch_batches`` with a one-window shuffle buffer), and prints both
rates. The store is reused by later runs with the same ``--scale`` and ``--seed``.

Usage: ``python benchmarks/bench_train_data.py --scale 0.1 [--dir /tmp/bench_train_data] [--steps 20]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

COCO_IMAGES, REGIONS, REGION_DIM, CPI, VOCAB = 113_287, 36, 2048, 5, 10_000


POOL_VALUES = 1 << 25  # N(0, 1) float16 values drawn once; every unit's regions are a window of them


def build_store(path: Path, n_images: int, seed: int) -> Path:
    """The synthetic store (skipped when a complete one with the same shape is there).

    Region features are N(0, 1) float16: one pool of ``POOL_VALUES`` values is drawn once and each work unit
    writes a window of it at a random offset (drawing 8.4e9 fresh normals and converting them to float16 took
    most of the ~30 minutes a full-scale build needed on 2 cores). Each stored chunk (256 rows, 1 MB) is still a
    run of independent normals, so what the benchmark measures, zstd decoding and reading, sees the same bytes
    as fresh draws would give (the global feature is the first region); the store is written by
    ``FeatureStoreWriter``, the real format.
    """
    from setemb.feature_store import FeatureStore, FeatureStoreWriter

    attrs = {"dataset": "bench_train_data", "n_images": n_images, "seed": seed, "regions": "pool-window"}
    try:
        if {k: FeatureStore.open(path).attrs.get(k) for k in attrs} == attrs:
            return path
    except (FileNotFoundError, RuntimeError, ValueError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(POOL_VALUES, dtype=np.float32).astype(np.float16)
    pool = np.concatenate([pool, pool])  # a window starting anywhere in the first half never wraps
    writer = FeatureStoreWriter(path, attrs=attrs)
    n_captions = n_images * CPI
    image = writer.require_modality(
        "train", "image", n=n_images, backbone="precomputed", local_dim=REGION_DIM, global_dim=REGION_DIM,
        max_tokens=REGIONS, unit_size=256,
    )  # fmt: skip
    text = writer.require_modality(
        "train", "text", n=n_captions, backbone="glove", local_dim=None, global_dim=None, max_tokens=20,
        local_dtype="int32", unit_size=256 * CPI, attrs={"vocab_size": VOCAB},
    )  # fmt: skip
    start = time.perf_counter()
    for u in range(image.num_units):
        lo, hi = image.unit_items(u)
        offset = int(rng.integers(0, POOL_VALUES))
        regions = pool[offset : offset + (hi - lo) * REGIONS * REGION_DIM].reshape(hi - lo, REGIONS, REGION_DIM)
        image.write_unit(u, regions, regions[:, 0], [str(i) for i in range(lo, hi)])
        clo, chi = text.unit_items(u)
        lengths = rng.integers(8, 21, size=chi - clo)
        tokens = rng.integers(1, VOCAB, size=(chi - clo, 20), dtype=np.int32)
        text.write_unit(
            u, tokens, None, [str(c) for c in range(clo, chi)], lengths=lengths,
            caption_to_image=np.arange(clo, chi) // CPI,
        )  # fmt: skip
        if u % 50 == 0:
            print(f"  store: unit {u + 1}/{image.num_units} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    writer.finalize()
    return path


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples the process's RSS (and the block caches' resident bytes) every 20 ms until ``stop``."""

    def __init__(self, tables=()) -> None:
        self.tables = tables
        self.peak, self.cache_peak, self._stop = _rss(), self._cached(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _cached(self) -> int:
        return sum(t.cached_bytes for t in self.tables)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak, self.cache_peak = max(self.peak, _rss()), max(self.cache_peak, self._cached())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss())


def worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.params import TrainParams
    from pipeline.ray_train import build_loss, resolve_model_kwargs
    from pipeline.train_data import epoch_batches, streaming_tables
    from setemb.feature_store import FeatureStore
    from setemb.model import create_model
    from setemb.training import CaptionIndex, ImageCaptionBatches, train_one_epoch

    train = TrainParams.model_validate(config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    store = FeatureStore.open(config["features"])
    split = store["train"]
    torch.manual_seed(0)
    kwargs = resolve_model_kwargs(train.model.model_dump(mode="json"), split.image.attrs, split.text.attrs)
    model = ray.train.torch.prepare_model(create_model(**kwargs).to(device))
    loss_fn = build_loss(train).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-4)

    def run(batches) -> None:  # the training step of stages.train (setemb.training.train_one_epoch)
        train_one_epoch(
            model, loss_fn, optimizer, batches, grad_clip=train.optim.grad_clip, amp=train.optim.amp, device=device
        )

    steps, warmup = config["steps"], config["warmup"]
    # "idle": this worker with torch imported, the store opened, the model (DDP-wrapped), loss and optimizer built,
    # before any step or read. Everything a training step adds on top (gradients, AdamW state, activations, the
    # allocator's retained pages, and in the streaming phase the tables, caches and read-ahead) counts above it.
    idle = _rss()
    image, text, bounds = streaming_tables(split, train.data, train.images_per_batch, CPI)
    captions = CaptionIndex(split.caption_to_image, len(image))

    def batches(epoch: int, n: int):
        sampler = ImageCaptionBatches(
            len(image), train.images_per_batch, seed=0, epoch=epoch, rank=rank, world_size=world, drop_last=False,
            bounds=bounds, window_blocks=train.data.window_blocks,
        )  # fmt: skip
        return epoch_batches(image, text, captions, sampler, n, train.data.prefetch_batches)

    # the floor first (so its memory is not inflated by the streaming phase): the shapes of a real batch, random
    # float32 tensors already in memory, the same model step; the blocks read for that one batch leave the caches
    # (an empty announcement drops them) so they are not counted in the floor
    images_b, texts_b, c2i = next(iter(batches(1, 1)))
    image.expect([])
    text.expect([])
    gen = torch.Generator().manual_seed(rank)
    bare_img = {k: None if v is None else _random_like(v, gen) for k, v in images_b.items()}
    bare_txt = {k: None if v is None else _random_like(v, gen) for k, v in texts_b.items()}
    del images_b, texts_b
    peak = _PeakRss()
    run(itertools.repeat((bare_img, bare_txt, c2i), warmup))
    start = time.perf_counter()
    run(itertools.repeat((bare_img, bare_txt, c2i), steps))
    bare_s = time.perf_counter() - start
    bare_peak = peak.stop()
    del bare_img, bare_txt

    peak = _PeakRss((image, text))
    image.blocks_read = text.blocks_read = 0
    stream = batches(0, steps + warmup)
    run(itertools.islice(stream, warmup))
    start = time.perf_counter()
    run(stream)
    stream_s = time.perf_counter() - start
    stream_peak = peak.stop()
    row = {
        "rank": rank,
        "idle_rss_gb": idle / 1e9,
        "stream_peak_above_idle_gb": (stream_peak - idle) / 1e9,
        "bare_peak_above_idle_gb": (bare_peak - idle) / 1e9,
        "cache_peak_gb": peak.cache_peak / 1e9,
        "stream_batches_per_s": steps / stream_s,
        "bare_batches_per_s": steps / bare_s,
        "image_blocks_read": image.blocks_read,
        "text_blocks_read": text.blocks_read,
    }
    Path(config["results_dir"], f"rank{rank}.json").write_text(json.dumps(row))
    ray.train.report({"rank": rank})


def compare_ray_data(store_path: Path, train, n_images: int) -> dict[str, float]:
    """Reading only (no model), images/s: ``epoch_batches`` over the store vs Ray Data over the same blocks
    (``map_batches`` reading each block's regions, global features and padded caption tokens, then
    ``iter_torch_batches`` of P images with a shuffle buffer of one window)."""
    import ray

    from pipeline.train_data import epoch_batches, streaming_tables
    from setemb.feature_store import FeatureStore
    from setemb.training import CaptionIndex, ImageCaptionBatches

    split = FeatureStore.open(store_path)["train"]
    P = train.images_per_batch
    image, text, bounds = streaming_tables(split, train.data, P, CPI)
    sampler = ImageCaptionBatches(
        len(image), P, seed=0, epoch=0, drop_last=True, bounds=bounds, window_blocks=train.data.window_blocks
    )
    steps = n_images // P
    start = time.perf_counter()
    for _ in epoch_batches(image, text, CaptionIndex(split.caption_to_image, len(image)), sampler, steps, 2):
        pass
    ours = steps * P / (time.perf_counter() - start)

    block = train.data.block_images
    path = str(store_path)

    def read_blocks(batch: dict) -> dict:
        from setemb.feature_store import FeatureStore as Store

        sp = Store.open(path)["train"]
        out: dict[str, list] = {"regions": [], "global": [], "tokens": [], "mask": []}
        for lo in batch["id"]:
            items = np.arange(lo * block, min((lo + 1) * block, len(sp.image)))
            local, glob, _ = sp.image.batch(items)
            captions = (items[:, None] * CPI + np.arange(CPI)).ravel()
            tokens, _, mask = sp.text.batch(captions)
            tokens = np.pad(tokens.numpy(), ((0, 0), (0, 20 - tokens.shape[1]))).reshape(len(items), CPI, 20)
            mask = np.pad(mask.numpy(), ((0, 0), (0, 20 - mask.shape[1]))).reshape(len(items), CPI, 20)
            out["regions"].extend(local.numpy().astype(np.float16))
            out["global"].extend(glob.numpy().astype(np.float16))
            out["tokens"].extend(tokens)
            out["mask"].extend(mask)
        return {k: np.stack(v) for k, v in out.items()}

    n_blocks = math.ceil(n_images / block)
    dataset = ray.data.range(n_blocks).random_shuffle(seed=0).map_batches(read_blocks, batch_size=1)
    start, seen = time.perf_counter(), 0
    for batch in dataset.iter_torch_batches(
        batch_size=P, local_shuffle_buffer_size=block * train.data.window_blocks, local_shuffle_seed=0
    ):
        seen += len(batch["regions"])
        if seen >= steps * P:
            break
    ray_data = seen / (time.perf_counter() - start)
    return {"stream_images_per_s": ours, "ray_data_images_per_s": ray_data}


def _random_like(t, gen):
    import torch

    if t.dtype == torch.bool:
        return t.clone()
    if t.dtype == torch.int64:
        return torch.randint(1, VOCAB, t.shape, generator=gen) * (t != 0)
    return torch.randn(t.shape, generator=gen)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of COCO's 113,287 train images")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_train_data")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ray-data", type=int, default=0, metavar="N", help="also compare reading N images (no model) with Ray Data"
    )
    args = parser.parse_args(argv)

    import logging

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.params import load_params

    n_images = max(256, round(COCO_IMAGES * args.scale))
    args.dir.mkdir(parents=True, exist_ok=True)
    store = build_store(args.dir / f"store_{n_images}.zarr", n_images, args.seed)
    du = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    train = load_params(args.params).train
    model = train.model.model_copy(update={"image_encoder": "region", "text_encoder": "bigru"})
    train = train.model_copy(update={"model": model})
    steps_needed = (args.steps + args.warmup) * train.images_per_batch * args.workers
    if steps_needed > n_images:
        raise SystemExit(f"{args.steps + args.warmup} steps need {steps_needed} images; raise --scale")
    results = Path(tempfile.mkdtemp(prefix="bench_train_data_"))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        TorchTrainer(
            worker_loop,
            train_loop_config={
                "train": train.model_dump(mode="json"),
                "features": str(store),
                "steps": args.steps,
                "warmup": args.warmup,
                "results_dir": str(results),
            },
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.use_gpu),
            run_config=RunConfig(name="bench", storage_path=str(results / "ray")),
        ).fit()
        rows = [json.loads((results / f"rank{r}.json").read_text()) for r in range(args.workers)]
        reading = compare_ray_data(store, train, args.ray_data) if args.ray_data else None
    finally:
        ray.shutdown()
        shutil.rmtree(results, ignore_errors=True)  # also after a failed run
    blocks = math.ceil(n_images / train.data.block_images)
    print(f"store: {n_images} images x {REGIONS} x {REGION_DIM} float16, {n_images * CPI} captions, {du / 1e9:.1f} GB")
    print(
        f"data: shuffle={train.data.shuffle} block_images={train.data.block_images} "
        f"window_blocks={train.data.window_blocks} prefetch={train.data.prefetch_batches}; P={train.images_per_batch}, "
        f"{args.workers} workers ({'GPU' if args.use_gpu else 'CPU'}), {args.steps} timed steps, {blocks} blocks"
    )
    print(
        "rank  idle RSS GB  peak above idle GB: bare step / streaming  stream batch/s  bare batch/s  stream/bare"
        "  blocks read  cache peak GB"
    )
    for r in rows:
        print(
            f"{r['rank']:>4}  {r['idle_rss_gb']:>11.2f}  "
            f"{r['bare_peak_above_idle_gb']:>28.2f} / {r['stream_peak_above_idle_gb']:>9.2f}  "
            f"{r['stream_batches_per_s']:>14.3f}  {r['bare_batches_per_s']:>12.3f}  "
            f"{r['stream_batches_per_s'] / r['bare_batches_per_s']:>11.2f}  {r['image_blocks_read']:>11}  "
            f"{r['cache_peak_gb']:>13.2f}"
        )
    if reading is not None:
        print(
            f"reading only, {args.ray_data} images in one process: epoch_batches "
            f"{reading['stream_images_per_s']:.0f} img/s, Ray Data {reading['ray_data_images_per_s']:.0f} img/s "
            f"(ratio {reading['stream_images_per_s'] / reading['ray_data_images_per_s']:.2f})"
        )


if __name__ == "__main__":
    main()
