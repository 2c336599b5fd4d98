"""What the streaming shuffle costs in accuracy: the demo model trained on `shapes` with each shuffle setting.

Trains ``params.yaml``'s demo configuration on the extracted `shapes` features (``dvc repro extract`` first) with:

* ``full``: a uniform permutation each epoch (what training did before it streamed; read item by item);
* ``blocks``: the default (``train.data``: blocks of 64 images, 16 blocks per shuffle window);
* ``tight``: blocks of 16 images, 2 per window (a 32-image shuffle buffer, smaller than one batch),

over ``--seeds`` seeds each (same seeds for every setting: paired), embeds and evaluates the test split, and prints
test RSUM per run, the mean and standard deviation per setting, and each setting's paired difference to ``full``
with a 95% t-interval. Wall time: about one demo training per run (4-5 min on 2 idle cores).

Usage: ``python benchmarks/bench_shuffle_quality.py [--seeds 0 1] [--settings full blocks tight] [--out runs.json]``;
``--merge a.json b.json`` adds the runs of earlier ``--out`` files to the table (``--seeds`` with no value: print the
merged table only). The runs behind the README's figures are in ``benchmarks/results/shuffle_quality_*.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "full": {"shuffle": "full"},
    "blocks": {"shuffle": "blocks", "block_images": 64, "window_blocks": 16},
    "tight": {"shuffle": "blocks", "block_images": 16, "window_blocks": 2},
}


def run_one(params, features: Path, relevance: str, work: Path) -> float:
    from pipeline.embedding import run_embed
    from pipeline.evaluation import run_evaluate
    from pipeline.training import run_train

    run_train(params, features=features, storage=work / "training", out=work / "model", quiet=True)
    run_embed(params, features=features, model=work / "model", out=work / "embeddings.zarr", quiet=True)
    metrics = run_evaluate(
        params, embeddings=work / "embeddings.zarr", model=work / "model", relevance=relevance,
        metrics=work / "metrics.json", plots=work / "plots",
    )  # fmt: skip
    return float(metrics["full"]["rsum"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--out", type=Path, default=None, help="write the runs as JSON here")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="earlier --out files to add to the table")
    args = parser.parse_args(argv)

    from pipeline.cli import setup_logging
    from pipeline.params import Params, load_params
    from pipeline.study_stats import paired

    setup_logging(quiet=True)
    base = load_params(args.params)
    features = Path(base.paths.features)
    rsum: dict[str, dict[int, float]] = {s: {} for s in args.settings}
    for earlier in args.merge:
        for setting, runs in json.loads(earlier.read_text())["rsum"].items():
            if setting in rsum:
                rsum[setting].update({int(seed): float(value) for seed, value in runs.items()})
    for seed in args.seeds:
        for setting in args.settings:
            data = base.model_dump(mode="json")
            data["seed"] = seed
            data["train"]["data"].update(SETTINGS[setting])
            params = Params.model_validate(data)
            start = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f"shuffle-{setting}-{seed}-") as work:
                rsum[setting][seed] = run_one(params, features, base.paths.relevance, Path(work))
            took = time.perf_counter() - start
            print(f"{setting:>6} seed {seed}: test RSUM {rsum[setting][seed]:.1f} ({took:.0f} s)", flush=True)
    print("\nsetting  runs  mean RSUM  std   paired diff to full (95% CI)")
    for setting in args.settings:
        seeds = sorted(rsum[setting])
        values = [rsum[setting][s] for s in seeds]
        if not values:
            continue
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        line = f"{setting:>7}  {len(values):>4}  {statistics.fmean(values):>9.1f}  {std:>4.1f}"
        if setting != "full" and rsum.get("full"):
            diff = paired(rsum[setting], rsum["full"])
            line += f"   {diff.format()}"
        print(line)
    if args.out is not None:
        seeds = sorted({seed for runs in rsum.values() for seed in runs})
        args.out.write_text(json.dumps({"seeds": seeds, "rsum": rsum}, indent=2))


if __name__ == "__main__":
    main()
