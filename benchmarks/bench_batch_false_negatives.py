"""In-batch false negatives of the training split against batch size: the share of captions whose batch holds another
image the caption truly describes (``relevance.json``, exhaustive on ``shapes``).

A hardest-negative triplet (DivE, PVSE, VSE++) takes the best-scoring non-paired image of the batch as its negative;
when that image matches the caption, the loss pushes a true match away. The share grows with the batch, which is one
reason the study trains on small batches (docs/DESIGN.md "Study verdicts"). Batches are uniform draws of
``images_per_batch`` images without replacement (the block shuffle mixes i.i.d. `shapes` images the same way).

Usage: ``python benchmarks/bench_batch_false_negatives.py [--sizes 8 16 32 128] [--batches 200]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.params import load_params  # noqa: E402
from pipeline.shapes import load_relevance  # noqa: E402
from setemb.data import read_karpathy  # noqa: E402


def false_negative_share(relevance: np.ndarray, caption_to_image: np.ndarray, batch: np.ndarray) -> float:
    """Share of the batch's captions with at least one relevant image in ``batch`` besides their own.

    ``relevance``: ``[C, N]`` bool; ``caption_to_image``: ``[C]``; ``batch``: image indices.
    """
    captions = np.flatnonzero(np.isin(caption_to_image, batch))  # [P * cpi]
    relevant = relevance[np.ix_(captions, batch)]  # [P * cpi, P]
    relevant &= caption_to_image[captions][:, None] != batch[None, :]
    return float(relevant.any(axis=1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--split", default="train")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 128], help="images per batch")
    ap.add_argument("--batches", type=int, default=200, help="random batches per size")
    args = ap.parse_args()
    paths = load_params(args.params).paths
    index = read_karpathy(paths.dataset_json, paths.image_root, args.split)
    relevance = load_relevance(paths.relevance, args.split, index)  # [C, N]
    others = relevance.sum(axis=1) - 1
    print(f"{args.split}: {len(index.image_ids)} images, {len(index.captions)} captions; other relevant images per "
          f"caption: mean {others.mean():.1f} ({others.mean() / len(index.image_ids):.1%} of the split)")  # fmt: skip
    rng = np.random.default_rng(0)
    for size in args.sizes:
        shares = [
            false_negative_share(relevance, index.caption_to_image, rng.choice(len(index.image_ids), size, False))
            for _ in range(args.batches)
        ]
        print(f"{size:4d} images per batch: {np.mean(shares):.1%} of captions have an in-batch false negative "
              f"(std over {args.batches} batches {np.std(shares):.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
