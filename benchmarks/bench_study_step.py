"""Seconds per training step of every cost class of the default study, and the default study's wall time from them.

The default study (``pipeline.study_grid.DEFAULT``, ``--grid all``) trains cells of a few cost classes (head,
similarity, K, T: ``_cost_class``). For one representative cell of each class this builds the model and loss from the
cell's params, as the study's training loop does (``setemb.training.train_one_epoch``, one torch thread, the study's
batches of ``StudySettings.images_per_batch`` images and all their captions), and measures CPU seconds per step over
``--steps`` steps after one warm-up step, on batches read beforehand; separately it measures the data path (read +
decode + gather, per batch, first epoch with a cold block cache and a warm one after). CPU seconds, not wall seconds, so
a busy machine measures the same step (a study cell runs one thread per core). It then feeds ``estimate_default_study``
with them (seconds per batch = step + data, averaged over the epochs; ``--epoch-overhead`` s of validation and
checkpoint per epoch and ``--variant-seconds`` s per evaluation, defaults from the 40.1-minute study of docs/results.md:
9 s per cell at 5 epochs) and prints the estimate for each ``--epochs``. ``--contention`` scales the step times for two
cells sharing the box (1.10 reproduces that study's 40.1 minutes from these step times).

Usage: ``nice -n 10 python benchmarks/bench_study_step.py [--steps 3] [--epochs 3 4 5] [--profile dive]``
(``--profile CLASS`` prints a torch.profiler table of that class's steps instead of the estimate).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.params import Params, load_params  # noqa: E402
from pipeline.profiles import PROFILES_DIR  # noqa: E402
from pipeline.ray_train import _optimization, build_loss, resolve_model_kwargs  # noqa: E402
from pipeline.study import JobOutcome, plan  # noqa: E402
from pipeline.study_grid import DEFAULT, GRIDS, _cost_class, build_grid, estimate_default_study, study_base  # noqa: E402
from pipeline.train_data import epoch_batches, streaming_tables  # noqa: E402
from pipeline.training import features_fingerprint  # noqa: E402
from setemb.feature_store import FeatureStore  # noqa: E402
from setemb.model import create_model  # noqa: E402
from setemb.training import CaptionIndex, ImageCaptionBatches, train_one_epoch  # noqa: E402


def _batches(params: Params, split, epochs: int) -> tuple[list, list[float]]:
    """The first epoch's batches (for the steps) and the data path's CPU seconds per batch of each epoch."""
    train = params.train
    image, text, bounds = streaming_tables(split, train.data, train.images_per_batch, params.extract.captions_per_image)
    index = CaptionIndex(split.caption_to_image, len(image))
    first, seconds = None, []
    for epoch in range(epochs):
        window = train.data.window_blocks
        sampler = ImageCaptionBatches(
            len(image), train.images_per_batch, seed=0, epoch=epoch, bounds=bounds, window_blocks=window
        )
        start = time.process_time()
        if first is None:  # kept for the steps
            first = list(epoch_batches(image, text, index, sampler, len(sampler), 0))
        else:  # consumed and dropped, as training does (keeping them would time fresh allocations)
            for _ in epoch_batches(image, text, index, sampler, len(sampler), 0):
                pass
        seconds.append((time.process_time() - start) / len(sampler))
    return first, seconds


def step_seconds(params: Params, split, batches: list, steps: int, profile: bool = False) -> float:
    """CPU seconds per training step of ``params``'s model (one thread), after one warm-up step."""
    train = params.train
    torch.manual_seed(0)
    kwargs = resolve_model_kwargs(train.model.model_dump(mode="json"), split.image.attrs, split.text.attrs)
    model, loss_fn = create_model(**kwargs), build_loss(train)
    optimizer, scheduler, _, _ = _optimization(model, loss_fn, train, len(batches), torch.device("cpu"))
    run = lambda part: train_one_epoch(  # noqa: E731
        model, loss_fn, optimizer, part, scheduler=scheduler, grad_clip=train.optim.grad_clip
    )
    run(batches[:1])
    timed = batches[1 : 1 + steps]
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(timed)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25))
    start = time.process_time()
    run(timed)
    return (time.process_time() - start) / len(timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--features", type=Path, default=None, help="feature store (default paths.features)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per cost class")
    ap.add_argument("--epochs", type=int, nargs="+", default=[3, 4, 5], help="epochs to estimate the study for")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epoch-overhead", type=float, default=1.8, help="validation + checkpoint seconds per epoch")
    ap.add_argument("--variant-seconds", type=float, default=3.0, help="seconds per evaluation variant")
    ap.add_argument("--contention", type=float, default=1.0, help="step-time factor for two cells on the box")
    ap.add_argument("--profile", default=None, help="a cost-class label (e.g. dive): print its torch.profiler table")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    features = args.features or Path(params.paths.features)
    split = FeatureStore.open(features)["train"]
    digest = features_fingerprint(features)
    base = study_base(params, DEFAULT)
    cells = [c for g in GRIDS for c in build_grid(g, base, DEFAULT, PROFILES_DIR)]
    stamped, jobs = plan(cells, "/tmp/unused", features=features, features_digest=digest, relevance=None)
    label = {c.fingerprint: f"{c.grid}:{c.label}" for c in reversed(stamped)}  # the first grid naming the cell
    batches, data = _batches(Params.model_validate(base), split, max(args.epochs))
    print(f"data path: {data[0]:.3f} CPU s/batch cold (first epoch), {sum(data[1:]) / max(len(data) - 1, 1):.3f} warm")
    classes: dict[tuple, tuple[str, float]] = {}
    for job in jobs:
        key = _cost_class(job.params)
        if key in classes:
            continue
        name = label[job.fingerprint]
        if args.profile and args.profile not in name:
            continue
        seconds = step_seconds(Params.model_validate(job.params), split, batches, args.steps, bool(args.profile))
        classes[key] = (name, seconds)
        print(f"{name:46s} {seconds:.3f} CPU s/step", flush=True)
    if args.profile:
        return
    for epochs in args.epochs:
        settings = replace(DEFAULT, epochs=epochs)
        per_batch = {k: (s + sum(data[:epochs]) / epochs) * args.contention for k, (_, s) in classes.items()}
        outcomes = []
        for job in jobs:
            steps = len(batches) * epochs
            train_s = per_batch[_cost_class(job.params)] * steps
            record = {
                "train": {"steps": steps, "epochs": epochs, "epoch_seconds": train_s,
                          "seconds": train_s + args.epoch_overhead * epochs},
                "variants": {"v": {"seconds": args.variant_seconds}},
            }  # fmt: skip
            outcomes.append(JobOutcome(job, record, cached=False, seconds=0.0))
        est = estimate_default_study(outcomes, params, features, digest, args.workers, PROFILES_DIR, settings)
        print(
            f"--grid all at {epochs} epochs: {est['cells']:.0f} cells x {est['seeds']:.0f} seeds on {args.workers} "
            f"workers: ~{est['minutes']:.0f} min ({est['fixed_minutes']:.1f} evaluation + "
            f"{est['minutes_per_epoch']:.1f} per epoch)"
        )


if __name__ == "__main__":
    main()
