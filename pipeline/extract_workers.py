"""Where extraction work units run: in-process, or on Ray actors holding one CPU thread or ``gpus_per_worker`` GPUs.

`WorkerPool` is the only code in extraction that knows Ray. What a unit computes is `pipeline.extraction.UnitJob`;
the pool only decides where: in this process (``workers <= 1``), or on Ray actors started on first use and reused for
every job, at most two units in flight per actor (``ray.wait`` hands a finished actor its next unit).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from pipeline.cli import StageError
from pipeline.devices import Compute, gpu_count

if TYPE_CHECKING:
    from pipeline.extraction import UnitJob


def default_workers() -> int:
    """CPU cores usable by this process (the meaning of ``workers = 0``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _UnitWorker:
    """A Ray actor; backbones are built once per process (cached) and reused across jobs.

    Args:
        threads: torch intra-op threads (1 on CPU, PLATFORM §9; None = leave Ray's setting, for GPU actors).
    """

    def __init__(self, threads: int | None = 1) -> None:
        if threads is not None:
            torch.set_num_threads(threads)

    def setup(self, job: UnitJob) -> int:
        if job.backbone is not None:
            job.backbone.build()
        return os.getpid()

    def run(self, job: UnitJob, unit: int) -> int:
        return sum(n for _, n in job.run([unit]))


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class WorkerPool:
    """Where units run: in-process for ``workers <= 1``, else on ``workers`` Ray actors started on first use.

    On CPU every worker computes with ONE torch thread (the in-process one too), so the stored values do not depend
    on ``workers`` (oneDNN convolutions round differently with 1 and 2 threads). On CUDA each actor requests
    ``gpus_per_worker`` GPUs and an equal share of the cluster's CPUs, which become its decode threads. Ray is started
    locally (``ray.init(num_cpus=<cores>)``, no dashboard, worker logs off) or attached to ``RAY_ADDRESS``, and shut
    down on exit only if this pool started it. Use as a context manager; the actors are reused for every job.

    Args:
        workers: number of workers; 0 = one per CPU core (CPU) or one per ``gpus_per_worker`` GPUs (CUDA).
        compute: the resolved device / autocast (`pipeline.devices.resolve_compute`); default CPU float32.
        gpus_per_worker: GPUs each CUDA actor holds (fractions share a GPU between actors).
    """

    def __init__(self, workers: int = 1, compute: Compute | None = None, gpus_per_worker: float = 1.0) -> None:
        self.compute = compute or Compute()
        self.gpus_per_worker = gpus_per_worker
        if workers == 0:
            on_gpu = self.compute.device == "cuda"
            workers = max(1, math.floor(gpu_count() / gpus_per_worker)) if on_gpu else default_workers()
        self.workers = workers
        self._actors: list[Any] = []
        self._started_ray = False

    @property
    def decode_threads(self) -> int:
        """Decode threads per worker: 1 on CPU (the core belongs to the forward pass); on CUDA the worker's share of
        the CPU cores (at least 2), so decoding keeps up with the GPU."""
        if self.compute.device == "cpu":
            return 1
        return max(2, default_workers() // max(1, self.workers))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._actors or self._started_ray:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def run(self, job: UnitJob, units: list[int], bar: Any) -> None:
        """Compute ``units`` of ``job``, updating ``bar`` with the items of each finished unit."""
        if self.workers <= 1 or job.kind == "regions" or len(units) == 1:
            threads = _one_torch_thread() if self.compute.device == "cpu" else contextlib.nullcontext()
            with threads:
                for _, n in job.run(units):
                    bar.update(n)
        else:
            self._run_ray(job, units, bar)

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
            if os.environ.get("RAY_ADDRESS"):
                ray.init(**quiet)
            else:
                ray.init(num_cpus=default_workers(), include_dashboard=False, **quiet)
            self._started_ray = True
        if not self._actors:
            resources = ray.cluster_resources()
            cpus = float(resources.get("CPU", self.workers))
            if self.compute.device == "cuda":
                gpus = float(resources.get("GPU", 0.0))
                if gpus < self.gpus_per_worker * self.workers:
                    raise StageError(
                        f"{self.workers} extraction workers x {self.gpus_per_worker} GPUs need "
                        f"{self.workers * self.gpus_per_worker:g} GPUs, the Ray cluster has {gpus:g}; lower "
                        f"extract.workers or extract.gpus_per_worker"
                    )
                share = max(1.0, math.floor(cpus / self.workers)) if cpus >= self.workers else cpus / self.workers
                # two units at once per actor: one decodes / writes while the other runs on the GPU
                options = {"num_gpus": self.gpus_per_worker, "num_cpus": share, "max_concurrency": 2}
                self._actors = [ray.remote(_UnitWorker).options(**options).remote(None) for _ in range(self.workers)]
            else:
                actor_cls = ray.remote(_UnitWorker).options(num_cpus=min(1.0, cpus / self.workers))
                self._actors = [actor_cls.remote() for _ in range(self.workers)]
        return ray

    def _run_ray(self, job: UnitJob, units: list[int], bar: Any) -> None:
        """Two units in flight per actor; a finished unit frees its actor for the next one (``ray.wait``)."""
        ray = self._ray()
        from ray.exceptions import RayActorError, RayTaskError

        try:
            job_ref = ray.put(job)
            ray.get([a.setup.remote(job_ref) for a in self._actors])
            todo, running = deque(units), {}
            for actor in self._actors * 2:
                if todo:
                    running[actor.run.remote(job_ref, todo.popleft())] = actor
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                actor = running.pop(done[0])
                bar.update(ray.get(done[0]))
                if todo:
                    running[actor.run.remote(job_ref, todo.popleft())] = actor
        except RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise
        except RayActorError as err:
            self._actors = []
            raise StageError(
                f"an extraction worker died ({type(err).__name__}); finished units are kept, re-run to resume"
            ) from None
