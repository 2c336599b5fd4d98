"""The console of a training run: one progress bar and one summary line per epoch.

In local mode the loop runs in the driver's process and draws its own bar (``Progress`` with no channel). With Ray
workers rank 0 sends step counts and each epoch's metrics through a Ray queue to the driver's ``DriverConsole``,
while Ray's own per-worker lines stay off the console unless ``--debug``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger("pipeline.ray_train")  # the stage's summary lines keep their logger name


class Progress:
    """One epoch's progress on rank 0, fed by ``train_one_epoch``'s progress callback: a tqdm bar on stderr (TTY only)
    when the loop runs in the driver's process, else messages to the driver's ``DriverConsole`` queue."""

    def __init__(self, total: int, epoch: int, enabled: bool, channel: Any = None) -> None:
        self.bar, self.channel, self.total, self.epoch = None, channel, total, epoch
        if enabled and channel is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"Train Epoch {epoch}", file=sys.stderr, leave=False)

    def __call__(self, steps: int, means: dict[str, float]) -> None:
        if self.channel is not None:
            self.channel.put_nowait({"epoch": self.epoch, "steps": steps, "total": self.total, "loss": means["loss"]})
        if self.bar is not None:
            self.bar.update(steps - self.bar.n)
            self.bar.set_postfix(loss=f"{means['loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_summary(metrics: dict[str, Any], epochs: int) -> str:
    """The one console line of an epoch: ``epoch 3/15: loss 0.1234, val RSUM 140.2 (best 141.0), 12.3 s``."""
    parts = [f"loss {metrics['train_loss']:.4f}"] if "train_loss" in metrics else []
    if "val_rsum" in metrics:
        parts.append(f"val RSUM {metrics['val_rsum']:.1f} (best {metrics['best_val_rsum']:.1f})")
    if "epoch_time_s" in metrics:
        parts.append(f"{metrics['epoch_time_s']:.1f} s")
    return f"epoch {int(metrics['epoch']) + 1}/{epochs}: " + ", ".join(parts)


class DriverConsole:
    """The driver's view of a distributed run: one progress bar and one summary line per epoch.

    Rank 0 sends step counts and each epoch's metrics through a Ray queue (an actor with no CPU); a thread of the
    driver draws them, while Ray's own per-worker lines stay off the console (``log_to_driver`` only with debug).
    """

    def __init__(self, epochs: int, *, bar: bool) -> None:
        import threading

        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.epochs, self.show_bar, self.bar = epochs, bar, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="setemb-console", daemon=True)
        self._thread.start()

    def _show(self, item: dict[str, Any]) -> None:
        if "note" in item:  # a one-off line from rank 0 (e.g. where a resumed run starts)
            logger.info("%s", item["note"])
            return
        if "summary" in item:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            logger.info("%s", epoch_summary(item["summary"], self.epochs))
            return
        if not self.show_bar:
            return
        if self.bar is None or self.bar.desc != f"Train Epoch {item['epoch']}":
            from tqdm import tqdm

            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=item["total"], desc=f"Train Epoch {item['epoch']}", file=sys.stderr, leave=False)
        self.bar.update(item["steps"] - self.bar.n)
        self.bar.set_postfix(loss=f"{item['loss']:.4f}")

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self.queue.get(timeout=0.2)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue actor went away with the cluster: nothing left to show
                return
            self._show(item)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.bar is not None:
            self.bar.close()
