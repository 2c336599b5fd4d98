"""The study base (DivE) trained on feature stores that differ only in ``extract.image_transform``: paired RSUM.

Each ``--store LABEL=PATH`` is a complete feature store of the same data (e.g. one extracted with
``--image-transform center_crop``, one with ``resize``). For every seed the study's DivE cell (``stages.study``'s base:
params.yaml + profiles/dive.yaml, local-mode training for the study's epochs, test-split evaluation) is trained and
evaluated on each store with `pipeline.study_grid.run_cell`, so both arms see the same seeds, batches and model
initialisation and differ only in the image features. It prints the test RSUM of each run, each store's mean ± std
over the seeds, and the paired difference (second store minus first) with its 95% Student-t interval.

Results are cached per (store, seed) under ``--out`` (a rerun, or a killed run, reuses finished cells and resumes
training from its last finished epoch); ``--only LABEL`` trains one store's cells, so the two arms can run as two
processes, and a final run without it prints the summary from the cache.

    python -m stages.extract --image-transform resize --workers 1 --out artifacts/features-resize.zarr
    python -m stages.extract --image-transform center_crop --workers 1 --out artifacts/features-crop.zarr
    python benchmarks/bench_image_transform.py --store center_crop=artifacts/features-crop.zarr \\
        --store resize=artifacts/features-resize.zarr --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.feature_cache import store_image_transform  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.profiles import PROFILES_DIR, validate_merged  # noqa: E402
from pipeline.study import CellJob, Variant, cell_fingerprint  # noqa: E402
from pipeline.study_grid import DEFAULT, _dive, run_cell, study_base  # noqa: E402
from pipeline.study_stats import paired  # noqa: E402
from pipeline.training import features_fingerprint  # noqa: E402


def store_transform(path: Path) -> str | None:
    """The ``image_transform`` a store was extracted with (stores from before the param: ``center_crop``)."""
    from setemb.feature_store import FeatureStore

    return store_image_transform(dict(FeatureStore.open(path).attrs))


def crop_loss_on_shapes(relevance: Path, crop_fraction: float = 0.875) -> dict[str, float]:
    """How much of each `shapes` object a centre crop removes: each object is its disc (centre and radius from
    relevance.json, `pipeline.shapes.SIZES`), sampled on a 201 x 201 grid; the crop keeps the central
    ``crop_fraction`` of each side (224 of 256)."""
    import numpy as np

    from pipeline.shapes import SIZES

    margin = (1 - crop_fraction) / 2
    g = np.linspace(-1, 1, 201)
    X, Y = np.meshgrid(g, g)
    disc = X**2 + Y**2 <= 1
    lost = []
    for split in json.loads(Path(relevance).read_text())["splits"].values():
        for scene in split["scenes"]:
            for _shape, _colour, size, cx, cy in scene:
                x, y = cx + SIZES[size] * X[disc], cy + SIZES[size] * Y[disc]
                inside = (x >= margin) & (x <= 1 - margin) & (y >= margin) & (y <= 1 - margin)
                lost.append(1 - inside.mean())
    lost = np.asarray(lost)
    return {"objects": len(lost), "mean_area_lost": float(lost.mean()), "any_lost": float((lost > 0).mean()),
            "over_10pct_lost": float((lost >= 0.1).mean()), "max_lost": float(lost.max())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", action="append", required=True, help="LABEL=PATH of a feature store (two of them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=DEFAULT.epochs, help="epochs per run (the study's default)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--relevance", default=None, help="relevance JSON (default paths.relevance)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench_image_transform"))
    parser.add_argument("--only", default=None, help="train only this store's cells (run one process per store)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    stores = dict(s.split("=", 1) for s in args.store)
    if len(stores) != 2:
        parser.error("give exactly two --store LABEL=PATH")
    params = load_params(args.params)
    base = study_base(params, DEFAULT)
    base["train"]["optim"]["epochs"] = args.epochs
    relevance = (params.paths.relevance if args.relevance is None else args.relevance) or None
    rsum: dict[str, dict[int, float]] = {label: {} for label in stores}
    for seed in args.seeds:
        cell = validate_merged(_dive(base, PROFILES_DIR, seed), "dive").model_dump(mode="json")
        for label, path in stores.items():
            if args.only is not None and label != args.only:
                continue
            path = Path(path).resolve()
            digest = features_fingerprint(path)
            fp = cell_fingerprint(cell, digest)
            job = CellJob(fp, str(args.out.resolve() / label / f"seed{seed}"), cell, str(path),
                          None if not relevance else str(Path(relevance).resolve()), [Variant()], [])  # fmt: skip
            record = run_cell(job)
            metrics = record["variants"][Variant().key]["metrics"]
            value = float((metrics.get("full") or metrics.get("five_fold_1k"))["rsum"])
            rsum[label][seed] = value
            print(f"{label} ({store_transform(path)}, {path}) seed {seed}: test RSUM {value:.2f} "
                  f"(train {record['train']['seconds']:.0f} s)", flush=True)  # fmt: skip
    if args.only is not None:
        return
    if relevance is not None and Path(relevance).is_file():
        loss = crop_loss_on_shapes(Path(relevance))
        print(f"center_crop on shapes: of {loss['objects']} objects, {loss['any_lost']:.1%} lose some area, "
              f"{loss['over_10pct_lost']:.1%} lose >= 10%, mean {loss['mean_area_lost']:.1%}, max "
              f"{loss['max_lost']:.1%}")  # fmt: skip
    first, second = stores
    for label in stores:
        values = list(rsum[label].values())
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{label}: RSUM {statistics.fmean(values):.2f} ± {std:.2f} (mean ± std over seeds {args.seeds})")
    diffs = [rsum[second][s] - rsum[first][s] for s in args.seeds]
    diff = paired(rsum[second], rsum[first])
    no_ci = diff.half_width is None
    mean, low, high = diff.mean, float("nan") if no_ci else diff.low, float("nan") if no_ci else diff.high
    print(f"{second} - {first}: {mean:+.2f} RSUM, 95% t-interval [{low:+.2f}, {high:+.2f}] "
          f"(paired over {len(diffs)} seeds: {', '.join(f'{d:+.2f}' for d in diffs)})")  # fmt: skip
    summary = {"stores": stores, "seeds": args.seeds, "epochs": args.epochs, "rsum": rsum, "diff": [mean, low, high]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
