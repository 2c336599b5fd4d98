"""Run frozen backbones over a split and write the Zarr feature store in resumable work units (M§2; PLATFORM §7, §9).

One split is extracted by `run_extraction`: the image side (decoded images through a visual backbone, or precomputed
region rows copied from a memmapped/HDF5 array, global = max pool, M§2), then the text side (captions through MiniLM /
BERT, or GloVe token ids). Each side is cut into work units of ``items_per_unit`` items; a unit is computed and
written whole (``setemb.feature_store`` marks it done last), so a killed run redoes only the units not marked done.

Parallelism: ``workers == 1`` runs in-process (no Ray). ``workers > 1`` spreads units over that many Ray actors, each
loading its backbone once; each actor writes distinct, chunk-aligned units, which the store guarantees are race-free.
On CPU every worker runs torch with one thread (PLATFORM §9: two one-thread processes beat one two-thread process).
On CUDA (`pipeline.devices`) each actor holds ``gpus_per_worker`` GPUs (``num_gpus``) and the CPUs left per GPU for
decoding, runs two units at once (so one unit's decode and Zarr write overlap the other's forward pass), and the
backbone runs under float16 autocast unless ``extract.precision`` says otherwise.

Overlap inside a process: images are decoded and batched by `pipeline.image_loader.BatchLoader` threads ahead of the
forward pass (pinned batches, non-blocking copies on CUDA), and each finished unit is written to Zarr by a writer
thread while the next unit computes. Ray Data's ``map_batches`` is not used, for the reasons in docs/DESIGN.md
("Extraction on accelerators").

Test hook: when the environment variable ``SETEMB_TEST_KILL_AFTER_UNITS=N`` is set, the process that writes its N-th
work unit kills itself with SIGKILL right after the write (used by the resume tests; never set it otherwise).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pipeline.devices import Compute
from pipeline.extract_workers import WorkerPool
from pipeline.image_backbones import BadImageError, PrecomputedRegions, create_visual_backbone, decode_image
from pipeline.image_loader import BatchLoader, scan_images
from pipeline.text_backbones import create_text_backbone
from setemb.data import SplitIndex, missing_images
from setemb.feature_store import FeatureStoreWriter, ModalityWriter

logger = logging.getLogger(__name__)

_SKIP_HINT = "set extract.on_bad_image: skip to leave such images (and their captions) out"
KILL_AFTER_UNITS_ENV = "SETEMB_TEST_KILL_AFTER_UNITS"  # test hook, see the module docstring
_units_written = 0  # units written by this process (for the test hook)


class UnreadableImageError(ValueError):
    """A missing or undecodable image with ``on_bad_image="fail"``; the message names the file and the fix.

    (A plain one-argument exception, so it survives pickling out of a Ray actor.)
    """


# ------------------------------------------------------------------------------------------------------ helpers
def subset_index(index: SplitIndex, keep: Sequence[int] | np.ndarray) -> SplitIndex:
    """The split restricted to images ``keep`` (in order) and their captions; ``caption_to_image`` is rebuilt.

    Args:
        index: the full split.
        keep: [n_kept] increasing image positions to keep.
    """
    keep = np.asarray(keep, dtype=np.int64)
    if len(keep) == index.n_images and np.array_equal(keep, np.arange(index.n_images)):
        return index
    cpi = index.captions_per_image
    caps = (keep[:, None] * cpi + np.arange(cpi)[None, :]).reshape(-1)  # [n_kept * cpi]
    return SplitIndex(
        name=index.name,
        image_ids=[index.image_ids[i] for i in keep],
        image_paths=None if index.image_paths is None else [index.image_paths[i] for i in keep],
        captions=[index.captions[c] for c in caps],
        caption_ids=[index.caption_ids[c] for c in caps],
        caption_to_image=np.repeat(np.arange(len(keep), dtype=np.int64), cpi),
        captions_per_image=cpi,
        region_rows=None if index.region_rows is None else np.asarray(index.region_rows)[keep],
        dataset=index.dataset,
    )


@dataclass(frozen=True)
class BackboneSpec:
    """What a worker needs to build a backbone: ``create_{kind}_backbone(name, weights, device, **kwargs)``."""

    kind: Literal["visual", "text"]
    name: str
    weights: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = ()
    device: str = "cpu"

    def build(self) -> torch.nn.Module:
        return _build_backbone(self)


@functools.lru_cache(maxsize=4)
def _build_backbone(spec: BackboneSpec) -> torch.nn.Module:
    create = create_visual_backbone if spec.kind == "visual" else create_text_backbone
    return create(spec.name, weights=spec.weights, device=spec.device, **dict(spec.kwargs))


def _after_unit_written() -> None:
    global _units_written
    _units_written += 1
    limit = os.environ.get(KILL_AFTER_UNITS_ENV)
    if limit and _units_written >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- work units
@dataclass
class UnitJob:
    """Everything a process needs to compute and write the units of one ``<split>/<modality>`` group. Picklable.

    Attributes:
        writer: the group's writer.
        kind: ``image`` (decode + visual backbone), ``regions`` (copy precomputed rows) or ``text``.
        items: image paths, region rows (int) or captions, one per stored item.
        ids: item ids.
        unit_size: items per work unit.
        backbone: the backbone to build (None for regions).
        batch_size: items per forward pass (batches never cross a unit boundary, so results do not depend on
            which process computes a unit).
        caption_to_image: ``[n]`` int64 for text.
        regions: ``[rows, N, D]`` array-like for ``regions`` (memmap or `HDF5Regions`).
        decode_threads: image decoding threads (0 = decode inline, without overlapping the forward pass).
        compute: device and autocast dtype of the backbone (regions are always copied on the CPU).
    """

    writer: ModalityWriter
    kind: Literal["image", "regions", "text"]
    items: Sequence[Any]
    ids: Sequence[str]
    unit_size: int
    backbone: BackboneSpec | None = None
    batch_size: int = 32
    caption_to_image: np.ndarray | None = None
    regions: Any = None
    decode_threads: int = 1
    compute: Compute = field(default_factory=Compute)

    def unit_range(self, unit: int) -> tuple[int, int]:
        return unit * self.unit_size, min(len(self.items), (unit + 1) * self.unit_size)

    def run(self, units: Sequence[int]) -> Iterator[tuple[int, int]]:
        """Compute and write ``units`` in order; yields ``(unit, items)`` after each write.

        A writer thread writes unit u while unit u + 1 computes (at most one write pending).
        """
        body = {"image": self._image_units, "regions": self._region_units, "text": self._text_units}[self.kind]
        pending: deque[tuple[int, Future]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="zarr-write") as writes:
            for unit, local, global_ in body(units):
                pending.append((unit, writes.submit(self._write, unit, local, global_)))
                while len(pending) > 1:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()

    def _batches(self, unit: int) -> Iterator[tuple[int, int]]:
        lo, hi = self.unit_range(unit)
        for b in range(lo, hi, self.batch_size):
            yield b, min(hi, b + self.batch_size)

    def _write(self, unit: int, local: list[np.ndarray], global_: list[np.ndarray] | None) -> int:
        lo, hi = self.unit_range(unit)
        c2i = None if self.caption_to_image is None else self.caption_to_image[lo:hi]
        gl = None if global_ is None else np.concatenate(global_)
        self.writer.write_unit(unit, local, gl, list(self.ids[lo:hi]), caption_to_image=c2i)
        _after_unit_written()
        return hi - lo

    def _image_units(self, units: Sequence[int]) -> Iterator[tuple[int, list, list | None]]:
        model = self.backbone.build()
        compute = self.compute

        def load(i: int) -> torch.Tensor:
            try:
                return model.preprocess(decode_image(self.items[i]))  # [3, H, W]
            except BadImageError as err:
                raise UnreadableImageError(f"{err}; {_SKIP_HINT}") from None

        ranges = [r for u in units for r in self._batches(u)]
        with BatchLoader(load, ranges, self.decode_threads, pin_memory=compute.pin_memory) as loader:
            batches = iter(loader)
            for unit in units:
                local, global_ = [], []
                for _ in self._batches(unit):
                    images = compute.to_device(next(batches))  # [B, 3, H, W]
                    with compute.autocast_context():
                        loc, glo, _ = model(images)  # [B, N, C], [B, C]
                    local.extend(loc.cpu().float().numpy())
                    global_.append(glo.cpu().float().numpy())
                yield unit, local, global_

    def _region_units(self, units: Sequence[int]) -> Iterator[tuple[int, list, list | None]]:
        _, R, D = self.regions.shape
        model = PrecomputedRegions(num_regions=R, feature_dim=D)
        rows = np.asarray(self.items, dtype=np.int64)
        for unit in units:
            local, global_ = [], []
            for lo, hi in self._batches(unit):
                x = torch.from_numpy(np.asarray(self.regions[rows[lo:hi]], dtype=np.float32))  # [B, R, D]
                loc, glo, _ = model(x)  # [B, R, D], [B, D] max pool (M§2 BUTD)
                local.extend(loc.numpy())
                global_.append(glo.numpy())
            yield unit, local, global_

    def _text_units(self, units: Sequence[int]) -> Iterator[tuple[int, list, list | None]]:
        model = self.backbone.build()
        for unit in units:
            local, global_ = [], []
            for lo, hi in self._batches(unit):
                with self.compute.autocast_context():
                    loc, glo, lengths = model.encode(list(self.items[lo:hi]))  # [B, T, C] or [B, T] ids, [B, C], [B]
                loc, lengths = loc.cpu(), lengths.cpu().numpy()
                loc = (loc if loc.dtype == torch.long else loc.float()).numpy()
                local.extend(loc[i, : lengths[i]] for i in range(len(lengths)))
                if glo is not None:
                    global_.append(glo.cpu().float().numpy())
            yield unit, local, global_ or None


# ------------------------------------------------------------------------------------------------------ running
def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, dynamic_ncols=True, leave=False)


def run_units(job: UnitJob, pool: WorkerPool, *, progress: bool = False, desc: str = "") -> dict[str, float]:
    """Compute the units of ``job`` not yet done on ``pool``.

    Returns:
        ``{"items": items computed now, "seconds": wall time, "items_per_s": throughput}``.
    """
    units = job.writer.remaining_units()
    total = sum(hi - lo for lo, hi in map(job.unit_range, units))
    start = time.perf_counter()
    with _bar(total, desc, progress) as bar:
        if units:
            pool.run(job, units, bar)
    seconds = time.perf_counter() - start
    rate = total / seconds if seconds > 0 else 0.0
    skipped = job.writer.num_units - len(units)
    done = f", {skipped} of {job.writer.num_units} units already done" if skipped else ""
    logger.info("%s: %d items in %.1f s (%.1f items/s)%s", desc, total, seconds, rate, done)
    return {"items": float(total), "seconds": seconds, "items_per_s": rate}


@dataclass
class SplitReport:
    """What `run_extraction` did for one split."""

    split: str
    images: int
    captions: int
    rejected: list[dict[str, str]] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)


def _filter_images(
    index: SplitIndex, on_bad_image: str, rejected: list[dict[str, str]] | None, threads: int
) -> tuple[SplitIndex, list[dict[str, str]]]:
    """Apply ``on_bad_image``: fail on missing files now (decode errors fail later, in the unit), or drop every
    unreadable image (``rejected`` = a previous scan of the same data, reused on resume)."""
    if on_bad_image == "fail":
        missing = missing_images(index)
        if missing:
            raise UnreadableImageError(
                f"image file not found: {missing[0]} ({len(missing)} of {index.n_images} {index.name} images are "
                f"missing); check the image root, or {_SKIP_HINT}"
            )
        return index, []
    if rejected is None:
        rejected = scan_images(index.image_paths, index.image_ids, threads)
    bad = {r["id"] for r in rejected}
    keep = [i for i, image_id in enumerate(index.image_ids) if image_id not in bad]
    if not keep:
        raise ValueError(
            f"every {index.name} image was rejected (first: {rejected[0]['path']}: {rejected[0]['reason']})"
        )
    if rejected:
        logger.warning("%s: %d images rejected (on_bad_image: skip), first: %s", index.name, len(rejected), rejected[0])
    return subset_index(index, keep), rejected


def run_extraction(
    index: SplitIndex,
    writer: FeatureStoreWriter,
    visual_backbone: str,
    text_backbone: str,
    *,
    image_weights: str | None = None,
    text_weights: str | None = None,
    visual_kwargs: dict[str, Any] | None = None,
    text_kwargs: dict[str, Any] | None = None,
    regions: Any = None,
    dtype: str = "float16",
    batch_size: int = 32,
    text_batch_size: int = 128,
    items_per_unit: int = 256,
    workers: int = 1,
    compute: Compute | None = None,
    gpus_per_worker: float = 1.0,
    pool: WorkerPool | None = None,
    limit: int | None = None,
    on_bad_image: Literal["fail", "skip"] = "fail",
    rejected: list[dict[str, str]] | None = None,
    decode_threads: int | None = None,
    progress: bool = False,
    on_filtered: Callable[[list[dict[str, str]]], None] | None = None,
) -> SplitReport:
    """Extract one split into ``writer``'s store: groups ``<split>/image`` and ``<split>/text``.

    Args:
        index: the split (image-major, M§6).
        writer: the store being written (created or resumed by the caller).
        visual_backbone: ``efficientnet_lite0`` / ``resnet152`` / ``resnext101`` / ``precomputed``.
        text_backbone: ``minilm`` / ``bert`` / ``glove`` (glove: ``text_kwargs={"vocab": <vocab.json>}``).
        image_weights, text_weights: weight paths (None = packaged / cached files, ``"random"`` = untrained).
        visual_kwargs, text_kwargs: extra backbone options (``image_size``, ``image_transform``, ``max_length``,
            ``vocab``).
        regions: ``[rows, N, D]`` region array-like when ``visual_backbone == "precomputed"``; image i is row
            ``index.region_rows[i]``.
        dtype: float storage dtype.
        batch_size, text_batch_size: images / captions per forward pass.
        items_per_unit: items per resumable work unit.
        workers: 1 = in-process; N > 1 = N Ray actors; 0 = one per CPU core or GPU (ignored when ``pool`` is given).
        compute: device and autocast dtype (`pipeline.devices.resolve_compute`); default CPU float32. Ignored when
            ``pool`` is given (the pool's is used).
        gpus_per_worker: GPUs per CUDA worker (ignored when ``pool`` is given).
        pool: a `WorkerPool` shared across splits (its Ray actors are reused); default: one for this call.
        limit: keep only the first ``limit`` images (and their captions).
        on_bad_image: ``fail`` (missing/corrupt image -> `BadImageError`) or ``skip`` (drop those images and their
            captions; they are returned in the report).
        rejected: a previous ``skip`` scan of this split to reuse (resume) instead of decoding every image again.
        decode_threads: threads decoding images ahead of the forward pass (per process); None = the pool's choice
            (1 on CPU, the worker's share of the cores on CUDA); 0 = decode inline (no overlap).
        progress: draw tqdm bars on stderr.
        on_filtered: called with the rejected records once the split is filtered, before any unit is computed.

    Returns:
        A `SplitReport`.

    Raises:
        UnreadableImageError: a missing or undecodable image with ``on_bad_image="fail"``.
        MissingWeightsError: backbone weights are not on disk.
        ValueError: a region array of the wrong shape, or every image rejected.
    """
    if pool is None:
        args = dict(locals())
        with WorkerPool(workers, compute, gpus_per_worker) as args["pool"]:
            return run_extraction(**args)
    if decode_threads is None:
        decode_threads = pool.decode_threads
    if limit is not None:
        index = subset_index(index, range(min(limit, index.n_images)))
    report_rejected: list[dict[str, str]] = []
    if visual_backbone == "precomputed":
        if regions is None or index.region_rows is None:
            raise ValueError("visual_backbone 'precomputed' needs regions= and an index with region_rows")
        _check_regions(regions)
    else:
        if index.image_paths is None:
            raise ValueError(
                f"split {index.name!r} has no image paths; visual_backbone {visual_backbone!r} needs images"
            )
        index, report_rejected = _filter_images(index, on_bad_image, rejected, max(2, decode_threads))
    if on_filtered is not None:
        on_filtered(report_rejected)
    report = SplitReport(index.name, index.n_images, index.n_captions, report_rejected)

    # Both groups first: missing weights or a bad layout fail before any unit is computed.
    image_job = _image_job(index, writer, visual_backbone, image_weights, visual_kwargs, regions, dtype,
                           batch_size, items_per_unit, decode_threads, pool.compute)  # fmt: skip
    text_job = _text_job(
        index, writer, text_backbone, text_weights, text_kwargs, dtype, text_batch_size, items_per_unit, pool.compute
    )
    report.timings["image"] = run_units(image_job, pool, progress=progress, desc=f"{index.name}/image")
    report.timings["text"] = run_units(text_job, pool, progress=progress, desc=f"{index.name}/text")
    return report


def _spec(
    kind: Literal["visual", "text"], name: str, weights: str | None, kwargs: dict | None, device: str = "cpu"
) -> BackboneSpec:
    weights = None if weights is None else str(weights)
    return BackboneSpec(kind, name, weights, tuple(sorted((kwargs or {}).items())), device)


def _image_job(
    index: SplitIndex,
    writer: FeatureStoreWriter,
    backbone: str,
    weights: str | None,
    kwargs: dict | None,
    regions: Any,
    dtype: str,
    batch_size: int,
    unit_size: int,
    decode_threads: int,
    compute: Compute,
) -> UnitJob:
    """The image group's job; the group is created on first use (building the backbone on the CPU, to learn its
    dims: on CUDA the driver's copy would otherwise hold a GPU that a worker needs)."""
    layout: dict[str, Any] = {"n": index.n_images, "backbone": backbone, "unit_size": unit_size}
    layout.update(local_dtype=dtype, global_dtype=dtype)
    if backbone == "precomputed":
        _, R, D = regions.shape
        if not _existing(writer, index.name, "image", index.n_images):
            writer.require_modality(index.name, "image", local_dim=D, global_dim=D, max_tokens=R, **layout)
        return UnitJob(
            writer.modality(index.name, "image"), "regions", index.region_rows, index.image_ids, unit_size,
            batch_size=batch_size, regions=regions,
        )  # fmt: skip
    spec = _spec("visual", backbone, weights, kwargs, compute.device)
    if not _existing(writer, index.name, "image", index.n_images, compute):
        m = _spec("visual", backbone, weights, kwargs).build()
        writer.require_modality(
            index.name, "image", local_dim=m.local_dim, global_dim=m.global_dim, max_tokens=m.max_tokens,
            grid=m.grid, attrs={"image_size": m.image_size, "image_transform": m.image_transform,
            "compute": compute.label}, **layout,
        )  # fmt: skip
    return UnitJob(
        writer.modality(index.name, "image"), "image", index.image_paths, index.image_ids, unit_size, spec,
        batch_size, decode_threads=decode_threads, compute=compute,
    )  # fmt: skip


def _text_job(
    index: SplitIndex,
    writer: FeatureStoreWriter,
    backbone: str,
    weights: str | None,
    kwargs: dict | None,
    dtype: str,
    batch_size: int,
    unit_size: int,
    compute: Compute,
) -> UnitJob:
    """The text group's job (created on first use); glove stores int32 token ids and ``vocab_size``."""
    spec = _spec("text", backbone, weights, kwargs, compute.device)
    if not _existing(writer, index.name, "text", index.n_captions, compute):
        m = _spec("text", backbone, weights, kwargs).build()
        attrs: dict[str, Any] = {"compute": compute.label}
        if hasattr(m, "vocab"):
            attrs["vocab_size"] = len(m.vocab)
        writer.require_modality(
            index.name, "text", n=index.n_captions, backbone=backbone, local_dim=m.local_dim,
            global_dim=m.global_dim, max_tokens=m.max_tokens, local_dtype=m.local_dtype or dtype,
            global_dtype=dtype, unit_size=unit_size, attrs=attrs,
        )  # fmt: skip
    return UnitJob(
        writer.modality(index.name, "text"), "text", index.captions, index.caption_ids, unit_size, spec, batch_size,
        caption_to_image=index.caption_to_image, compute=compute,
    )  # fmt: skip


def _existing(writer: FeatureStoreWriter, split: str, modality: str, n: int, compute: Compute | None = None) -> bool:
    """Whether ``<split>/<modality>`` was created by an earlier (interrupted) run; its item count must match, and so
    must the device / precision its units were computed with (a store never mixes them)."""
    name = f"{split}/{modality}"
    if name not in writer.root:
        return False
    attrs = writer.root[name].attrs
    if attrs.get("count") != n:
        raise ValueError(
            f"{writer.path}/{name} holds {attrs.get('count')} items, expected {n}; delete the store to re-extract"
        )
    before = attrs.get("compute", Compute().label)
    if compute is not None and before != compute.label:
        raise ValueError(
            f"{writer.path}/{name} was started on {before}, this run computes on {compute.label}; resume with the same "
            f"extract.device / extract.precision, or delete the store to re-extract"
        )
    return True


def _check_regions(regions: Any) -> None:
    shape = tuple(getattr(regions, "shape", ()))
    if len(shape) != 3 or min(shape) < 1 or shape[2] < shape[1]:
        raise ValueError(
            f"precomputed regions must be an (n, R, D) array such as (n, 36, 2048) with D >= R, got shape {shape}"
        )
