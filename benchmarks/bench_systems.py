"""Compared systems on paired seeds: study cells of the main grid, trained and evaluated exactly as ``stages.study``.

For each ``--systems`` profile and ``--seeds`` seed it builds the study cell (``pipeline.study_grid``: params.yaml
with the study settings: its epochs and images per batch, local mode, the profile and the seed), runs it with the
study's cell runner (train -> embed -> evaluate, cached per fingerprint under ``--cache``, so a rerun reads the finished
cells), and prints test RSUM per run and variant, then each system's paired difference to ``--baseline`` (same
seeds, same study base) with a 95% t-interval. Variants, as the main grid has them: PCME also by the mean cosine
over its samples and by μ only (``sample_in_eval: false``); PCME++ also by μ only (``csd`` with ``use_sigma:
false``). ``--set`` merges a JSON overlay into every cell (diagnosis).
Wall time: one study cell per run (1-3 min on 2 idle cores; PCME is the slowest).

Usage: ``python benchmarks/bench_systems.py --systems vsepp pcme pcmepp --seeds 0 1 2 [--baseline vsepp]``
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def variants(system: str):
    from pipeline.study import Variant

    if system == "pcme":
        return (
            Variant(),
            Variant("mean_samples", {"similarity": "mean_similarity"}),
            Variant("mu_only", model={"head_kwargs": {"sample_in_eval": False}}),
        )
    if system == "pcmepp":
        return (Variant(), Variant("mu_only", {"similarity_kwargs": {"use_sigma": False}}))
    return (Variant(),)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--systems", nargs="+", default=["vsepp", "pcme", "pcmepp"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline", default="vsepp")
    parser.add_argument("--set", dest="overlay", default="{}", help="JSON overlay merged into every cell")
    parser.add_argument("--cache", type=Path, default=Path("artifacts/bench_systems"))
    args = parser.parse_args(argv)

    from pipeline.cli import set_offline_env, setup_logging
    from pipeline.params import load_params
    from pipeline.profiles import PROFILES_DIR, load_profile, merge_overlay
    from pipeline.study import execute, plan
    from pipeline.study_grid import DEFAULT, _cell, run_cell, study_base
    from pipeline.study_stats import paired
    from pipeline.training import features_fingerprint

    set_offline_env()
    setup_logging(quiet=True)
    params = load_params(args.params)
    base, features = study_base(params, DEFAULT), Path(params.paths.features)
    cells = []
    for seed in args.seeds:
        for system in args.systems:
            data = merge_overlay(
                merge_overlay(base, {**load_profile(system, PROFILES_DIR), "seed": seed}), json.loads(args.overlay)
            )
            cells.append(_cell("bench", system, data, variants=variants(system)))
    cells, jobs = plan(
        cells, args.cache, features=features, features_digest=features_fingerprint(features),
        relevance=params.paths.relevance or None,
    )  # fmt: skip
    rsum: dict[tuple[str, str], dict[int, float]] = {}
    for cell, outcome in zip(cells, execute(jobs, run_cell, workers=0), strict=True):
        if outcome.error:
            print(f"{cell.label} seed {cell.seed}: FAILED {outcome.error}")
            continue
        for variant in outcome.record["variants"].values():
            value = float(variant["metrics"]["full"]["rsum"])
            rsum.setdefault((cell.label, variant["name"]), {})[cell.seed] = value
            took = outcome.record["train"]["seconds"]
            print(f"{cell.label:>7} {variant['name']:>8} seed {cell.seed}: RSUM {value:.1f} (trained in {took:.0f} s)")
    reference = rsum.get((args.baseline, "default"), {})
    print(f"\nsystem   variant   runs  mean RSUM  std   paired diff to {args.baseline} (95% t-interval)")
    for (system, name), values in rsum.items():
        seeds = sorted(values)
        std = statistics.stdev(values.values()) if len(values) > 1 else float("nan")
        line = f"{system:>7}  {name:>8}  {len(seeds):>4}  {statistics.fmean(values.values()):>9.1f}  {std:>4.1f}"
        diff = paired(values, reference)
        if system != args.baseline and diff.n:
            line += f"   {diff.format()} (seeds {list(diff.seeds)})"
        print(line)


if __name__ == "__main__":
    main()
