"""Image decoding beside the forward pass: decode threads, a batching thread, pinned batches (PLATFORM §9).

`BatchLoader` turns item positions into ready ``[B, 3, H, W]`` batches while the caller runs the backbone: a pool of
decode threads works up to a bounded look-ahead (PIL releases the GIL while it decodes and resizes, so the threads use
real cores), and one batching thread stacks the decoded images and, for a GPU, page-locks the batch (``pin_memory``) so
its copy to the device can be asynchronous (``non_blocking=True``). At most ``depth`` batches wait ready, so memory
stays bounded whatever the split size. This is the role of a ``torch.utils.data.DataLoader`` with workers, kept in
threads of the extraction process so that a bad image raises in that process, naming the file.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from pipeline.image_backbones import BadImageError, decode_image


def scan_images(paths: Sequence[Path], ids: Sequence[str], threads: int = 2) -> list[dict[str, str]]:
    """Decode every image once; the rejected ones as ``{"id", "path", "reason"}`` records (missing files included)."""

    def check(i: int) -> dict[str, str] | None:
        if not Path(paths[i]).is_file():
            return {"id": str(ids[i]), "path": str(paths[i]), "reason": "missing file"}
        try:
            decode_image(paths[i])
        except BadImageError as err:
            return {"id": str(ids[i]), "path": str(paths[i]), "reason": err.reason}
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [r for r in pool.map(check, range(len(paths))) if r is not None]


def prefetch(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any], lookahead: int) -> Iterator:
    """``fn(item)`` for each item, in order, computed by ``pool`` at most ``lookahead`` items ahead."""
    pending: deque[Future] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= lookahead:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class BatchLoader:
    """Batches ``torch.stack([load(i) for i in range(lo, hi)])`` for each ``(lo, hi)`` of ``ranges``, in order.

    Args:
        load: item position -> ``[3, H, W]`` tensor (decode + preprocess); its exceptions reach the consumer.
        ranges: consecutive ``(lo, hi)`` item ranges, one per batch.
        threads: decode threads; 0 decodes inline in the consumer's thread (no overlap: the benchmark baseline).
        pin_memory: page-lock each batch (only meaningful, and only allowed, with CUDA).
        depth: ready batches held at most.

    Use as a context manager (or call `close`): leaving early stops the threads.
    """

    def __init__(
        self,
        load: Callable[[int], torch.Tensor],
        ranges: Sequence[tuple[int, int]],
        threads: int = 1,
        pin_memory: bool = False,
        depth: int = 2,
    ) -> None:
        self.load, self.ranges, self.threads, self.pin_memory = load, list(ranges), threads, pin_memory
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.threads <= 0:
            for lo, hi in self.ranges:
                yield self._finish(torch.stack([self.load(i) for i in range(lo, hi)]))  # [B, 3, H, W]
            return
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        self._thread = threading.Thread(target=self._produce, name="batcher", daemon=True)
        self._thread.start()
        while True:
            item = self._ready.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        while self._thread is not None and self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._ready.get_nowait()
            except queue.Empty:
                self._thread.join(timeout=0.05)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _finish(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.pin_memory() if self.pin_memory else batch

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        order = [i for lo, hi in self.ranges for i in range(lo, hi)]
        largest = max((hi - lo for lo, hi in self.ranges), default=1)
        try:
            stream = prefetch(self._pool, self.load, order, lookahead=max(2 * largest, 2 * self.threads))
            for lo, hi in self.ranges:
                if self._stop.is_set():
                    return
                batch = self._finish(torch.stack([next(stream) for _ in range(hi - lo)]))  # [B, 3, H, W]
                if not self._put(batch):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(err))
            return
        self._put(_END)
