"""Where and in which precision the extraction backbones run (``extract.device``, ``extract.precision``).

`resolve_compute` turns the params into a `Compute`: ``device="auto"`` means CUDA when this process sees a CUDA device
(``torch.cuda.is_available()``) and, when the run attaches to a Ray cluster (``RAY_ADDRESS``), that cluster reports
GPUs; otherwise CPU. A local Ray cluster started by the extraction itself detects the same GPUs torch sees, so it is
not started just to ask. ``precision="auto"`` is float16 autocast on CUDA (convolutions and matmuls in fp16, while
autocast keeps reductions, softmax and normalisation in fp32) and plain float32 on CPU, which keeps CPU stores
bit-identical to those written before the GPU path existed. The error of the half-precision path is measured by
``tests/pipeline/test_devices.py``, not assumed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.cli import StageError

Device = Literal["cpu", "cuda"]
Autocast = Literal["float16", "bfloat16"]


class DeviceError(StageError):
    """``extract.device: cuda`` was asked for where no CUDA device is visible; the message says how to fix it."""


@dataclass(frozen=True)
class Compute:
    """A resolved device and autocast dtype (None = plain float32).

    Attributes:
        device: ``cpu`` or ``cuda`` (inside a Ray GPU actor, ``cuda`` is the GPU Ray assigned to it).
        autocast: the autocast dtype, or None for float32.
    """

    device: Device = "cpu"
    autocast: Autocast | None = None

    @property
    def label(self) -> str:
        """``cpu/float32``, ``cuda/float16``...: recorded in each feature group's attrs."""
        return f"{self.device}/{self.autocast or 'float32'}"

    @property
    def is_default(self) -> bool:
        """Whether this is the historical CPU float32 computation (fingerprints stay as they were for it)."""
        return self.device == "cpu" and self.autocast is None

    @property
    def pin_memory(self) -> bool:
        """Host batches are page-locked (pinned) so their copy to the GPU can be asynchronous."""
        return self.device == "cuda"

    @contextlib.contextmanager
    def autocast_context(self) -> Iterator[None]:
        """``torch.autocast`` for ``self.autocast`` on ``self.device``; a no-op for float32."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(device_type=self.device, dtype=getattr(torch, self.autocast)):
            yield

    def to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` on the device; a pinned host batch is copied without blocking the host thread."""
        if self.device == "cpu":
            return batch
        return batch.to(self.device, non_blocking=batch.is_pinned())


def ray_gpus() -> float | None:
    """GPUs of the Ray cluster this process is attached to (or attaches to through ``RAY_ADDRESS``); None when
    neither holds (a local cluster would be started later and sees the same GPUs as torch)."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return None
        import logging

        ray.init(log_to_driver=False, logging_level=logging.ERROR)
    return float(ray.cluster_resources().get("GPU", 0.0))


def resolve_compute(
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    *,
    cuda_available: Callable[[], bool] = torch.cuda.is_available,
    cluster_gpus: Callable[[], float | None] = ray_gpus,
) -> Compute:
    """The `Compute` for ``extract.device`` / ``extract.precision``.

    Args:
        device: ``auto`` (CUDA when visible, see the module docstring), ``cpu`` or ``cuda``.
        precision: ``auto`` (float16 autocast on CUDA, float32 on CPU), ``float32``, ``float16`` or ``bfloat16``
            (autocast dtypes; ``bfloat16`` also runs on CPU).
        cuda_available, cluster_gpus: where the CUDA and Ray GPU answers come from (tests replace them).

    Raises:
        DeviceError: ``device="cuda"`` and no CUDA device (or a Ray cluster without GPUs).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"extract.device must be auto, cpu or cuda, got {device!r}")
    if precision not in ("auto", "float32", "float16", "bfloat16"):
        raise ValueError(f"extract.precision must be auto, float32, float16 or bfloat16, got {precision!r}")
    resolved: Device = "cpu"
    if device != "cpu":
        visible = cuda_available()
        gpus = cluster_gpus() if visible else None
        if visible and (gpus is None or gpus > 0):
            resolved = "cuda"
        elif device == "cuda":
            where = "the Ray cluster reports no GPUs" if visible else "torch.cuda.is_available() is False"
            raise DeviceError(f"extract.device is cuda but {where}; set extract.device: auto or cpu")
    if precision == "auto":
        autocast: Autocast | None = "float16" if resolved == "cuda" else None
    else:
        autocast = None if precision == "float32" else precision
    if autocast == "float16" and resolved == "cpu":
        raise ValueError("extract.precision float16 needs CUDA; on CPU use bfloat16 or float32")
    return Compute(resolved, autocast)


def gpu_count() -> int:
    """GPUs usable by extraction workers: the Ray cluster's when attached, else the ones torch sees."""
    gpus = ray_gpus()
    return int(gpus) if gpus is not None else torch.cuda.device_count()
